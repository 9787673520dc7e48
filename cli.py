"""What every script shares: its argument parser (errors in one line), one check per kind of flag value, run
before any work, the device and autocast it runs under, and files no crash or second writer leaves torn."""
import argparse
import contextlib
import ctypes
import errno
import functools
import gc
import json
import math
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist


class CheckpointError(ValueError):
    """A checkpoint or released snapshot that cannot be used; the message is one line meant for the user."""


class Parser(argparse.ArgumentParser):
    """argparse with every error one line on stderr ('error: ...', status 2, no usage), the description as written."""

    def __init__(self, **kwargs):
        super().__init__(**{"formatter_class": argparse.RawDescriptionHelpFormatter, **kwargs})

    def error(self, message):
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)

    def parse_with_presets(self, argv, presets):
        """parse_args over the --preset's defaults; args.given: the flags the command line gave (defaults off)."""
        self.set_defaults(**presets[self.parse_known_args(argv)[0].preset])
        args = self.parse_args(argv)
        self._defaults.clear()
        for a in self._actions:
            a.default = argparse.SUPPRESS
        args.given = sorted(vars(self.parse_args(argv)))
        return args


def one_rank(message):
    """A failing process's exit: the message on rank 0 (or without torchrun), status 1 on the others: one line."""
    return message if int(os.environ.get("RANK", "0") or 0) == 0 else 1


def fail(message):
    """End a script with one line on stderr."""
    sys.exit(f"error: {message}")


@contextlib.contextmanager
def stop_signals():
    """SIGTERM and SIGHUP stop the work inside as Ctrl-C does; a closed stdout (`| head`) ends it quietly (status 1)."""
    def interrupt(*_):
        raise KeyboardInterrupt
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)} if main_thread else {}
    for stream in (sys.stdout, sys.stderr):  # text an ASCII terminal cannot show is escaped, not a traceback
        getattr(stream, "reconfigure", lambda **_: None)(errors="backslashreplace")
    try:
        yield
    except OSError as e:
        if not isinstance(e, BrokenPipeError) and e.errno != errno.ENOSPC:
            raise
        if sys.stdout is sys.__stdout__:  # stdout to nowhere, so that the exit's flush does not complain again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.stdout = open(os.devnull, "w")
        if isinstance(e, BrokenPipeError):
            sys.exit(1)
        fail(f"cannot write ({e.strerror}: a full disk, or output sent to /dev/full)")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_PRCTL = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform.startswith("linux") else None


def die_with_parent():
    """preexec_fn: SIGTERM to the child when its starter's thread ends, even by SIGKILL (Linux PR_SET_PDEATHSIG)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)


def script(main):
    """A script's main under stop_signals, where Ctrl-C ends it in one line."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            with stop_signals():
                return main(*args, **kwargs)
        except KeyboardInterrupt:
            fail("interrupted")
    return run


# one check per kind of value: argparse `type=` functions whose message names what is wrong
def int_at_least(low, high=2**63 - 1):
    def check(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}" if value < low else
                                             f"must be <= {high}, got {value}")
        return value
    return check


def float_in(low=-math.inf, high=math.inf, low_open=False, high_open=False):
    """A finite float in [low, high] (either end open if asked)."""
    def check(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text}")
        return value
    return check


positive_int, nonneg_int = int_at_least(1), int_at_least(0)
positive_float, nonneg_float, unit_float = float_in(0.0, low_open=True), float_in(0.0), float_in(0.0, 1.0)


def number_list(cast, kind, valid, rule):
    """A comma list of `cast` values ('8,16,32' -> [8, 16, 32]), each one `valid`, as `rule` says."""
    def check(text):
        try:
            values = [cast(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of {kind}") from None
        if not values or not all(map(valid, values)):
            raise argparse.ArgumentTypeError(f"{text!r} must list {rule}")
        return values
    return check


int_list = number_list(int, "integers", lambda v: v >= 1, "integers >= 1")
float_list = number_list(float, "numbers", lambda v: math.isfinite(v) and v > 0, "finite numbers > 0")


def output_file(flag, *endings):
    """An output file's path with one of these endings, in a writable folder, checked as the flag is read."""
    def check(path):
        if not path.endswith(endings):
            raise argparse.ArgumentTypeError(f"{path}: the file must end in {' or '.join(endings)}")
        return check_writable_file(path, flag)
    return check


def readable_file(text):
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not {'readable' if os.path.isfile(text) else 'a file'}")
    return text


def read_prompt(prompt):
    """--prompt: the text itself, or FILE:path to read it from a UTF-8 file."""
    if not prompt.startswith("FILE:"):
        return prompt
    try:
        with open(prompt[5:], "rb") as f:
            raw = f.read(2 ** 20 + 1)  # a prompt beyond 1 MiB is no prompt (and /dev/zero never ends)
        if len(raw) > 2 ** 20:
            fail(f"prompt file {prompt[5:]} holds more than 1 MiB")
        return raw.decode("utf-8")
    except OSError as e:
        fail(f"prompt file {prompt[5:]} cannot be read ({e.strerror})")
    except UnicodeDecodeError as e:
        fail(f"prompt file {prompt[5:]} is not UTF-8 text (bad byte at offset {e.start})")


def check_writable_dir(path, flag):
    """Make `path` (a folder) if needed and check that files can be written there; one-line error if not."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"{flag} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"{flag} {path} is not writable ({e.strerror})")
    return path


def check_writable_file(path, flag):
    """The folder of an output file must be writable; checked before the work that produces it."""
    check_writable_dir(os.path.dirname(os.path.abspath(path)), flag)
    if os.path.isdir(path):
        fail(f"{flag} {path} is a folder, not a file")
    return path


_DRY_RUNS = {}  # (script, flags) -> its finished process: asked again with the same flags, answered once


def dry_run(script, flags):
    """`script --dry_run flags` (train.py: its configs, parameters, FLOPs per step): scripts check each other's flags
    through the command line, never by importing each other; a bad flag is one line naming the script."""
    import subprocess
    path, key = os.path.join(os.path.dirname(os.path.abspath(__file__)), script), (script, tuple(flags))
    if key not in _DRY_RUNS:
        _DRY_RUNS[key] = subprocess.run([sys.executable, path, "--dry_run", *flags], capture_output=True, text=True)
    out = _DRY_RUNS[key]
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["failed"])[-1]
        fail(f"{script} {' '.join(flags)}: {last.removeprefix('error: ')}")
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else None


train_dry_run = functools.partial(dry_run, "train.py")


# device and precision
def pick_device(name):
    """'auto' -> cuda when present, else cpu; a device that does not exist here is a one-line error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        fail(f"--device {name}: only cpu and cuda are supported")
    return name


def check_memory(need, device, what):
    """Refuse, before any model is built or run, sizes whose `need` bytes alone outgrow the device's memory."""
    mem = torch.cuda.get_device_properties(device).total_memory if str(device).startswith("cuda") else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > mem:
        fail(f"{what} alone need {need / 2 ** 30:,.0f} GiB, more than the {mem / 2 ** 30:,.0f} GiB of {device}")


def setup_distributed(device):
    """Returns (rank, world, device). Works with or without torchrun."""
    device = pick_device(device)
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def all_reduce_mean(metrics, env):
    keys = sorted(metrics)
    t = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32, device=env["device"]) for k in keys])
    if env["world"] > 1:
        dist.all_reduce(t)
    return {k: float(v) / env["world"] for k, v in zip(keys, t)}


def cleanup_distributed():
    gc.collect()  # free DDP wrappers first: a reducer torn down after its process group can abort gloo
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def keep_freed_memory():
    """glibc returns big freed buffers (the logits) to the OS each step and maps them again, 15-60% of a CPU step;
    keep them: no mmap for big blocks, no trimming (mallopt M_MMAP_MAX = -4, M_TRIM_THRESHOLD = -1)."""
    with contextlib.suppress(OSError):  # not glibc: nothing to do
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)
        libc.mallopt(-1, 2**31 - 1)


def autocast(device, dtype):
    """bf16 autocast on the device's type for dtype 'bfloat16', else nothing."""
    on = dtype == "bfloat16"
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt, fig, path):
    """Write the figure to path (atomically: a kill or a full disk keeps the earlier plot) and free it -> path."""
    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, dpi=100, format=os.path.splitext(path)[1][1:] or "png"), "wb")
    finally:
        plt.close(fig)
    return path


# files
def write_atomic(path, write, mode="w"):
    """write(f) into a temporary file of this process, renamed to path: readers never see a torn file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def json_loads(text):
    """json.loads, where JSON nested too deep to parse (a hostile file) is a JSONDecodeError, not a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text if isinstance(text, str) else "", 0) from None


def read_json(path):
    """A UTF-8 JSON file's content (json_loads: nesting too deep is a JSONDecodeError)."""
    with open(path, encoding="utf-8") as f:
        return json_loads(f.read())


def write_json(path, obj, indent=2):
    write_atomic(path, lambda f: json.dump(obj, f, indent=indent))


def process_tag(pid):
    """A process as 'pid start-time' (Linux's /proc; the bare pid elsewhere): a pid reused later is another tag."""
    try:
        return f"{pid} {open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return str(pid)


def holder_alive(tag):
    """Whether the process a lock file names still runs (the same process, not a later one with its pid)."""
    try:
        pid = int(tag.split()[0])
        os.kill(pid, 0) if pid > 0 else int("no pid")  # os.kill(0) would signal our own group
    except PermissionError:
        return True  # another user's live process
    except (ValueError, IndexError, OSError):
        return False
    return process_tag(pid) == tag or " " not in tag


@contextlib.contextmanager
def folder_lock(out_dir, name="train.lock", writer="training run"):
    """One writer per folder, by a lock file naming its process (process_tag): a live writer's is a one-line
    refusal, a dead one's taken; the file appears whole (a hard link of a written one)."""
    path, tmp = os.path.join(out_dir, name), os.path.join(out_dir, f".{name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(process_tag(os.getpid()))
    try:
        for _ in range(2):
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                try:
                    held = open(path).read().strip()
                except OSError as e:
                    fail(f"{path} is not a lock file ({e.strerror}); remove it if no run is writing {out_dir}")
                if holder_alive(held):
                    fail(f"{out_dir} is being written by another {writer} (pid {held.split()[0]}); use another "
                         "--out_dir")
                os.remove(path)  # stale: its writer is gone
        else:
            fail(f"cannot take the lock {path}")
    finally:
        os.remove(tmp)
    try:
        yield
    finally:
        if os.path.exists(path):
            os.remove(path)
