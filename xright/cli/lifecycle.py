"""The process lifecycle of every CLI: exit codes, the errors that choose them, the ordered teardown."""

import os
import sys
from typing import Callable


class UsageError(ValueError):
    pass


# Exit codes of every CLI (README "Exit codes"): the code the run decided, on every rank.
EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_NONFINITE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143


class Terminated(Exception):
    """SIGTERM: the run checkpointed and stopped before its last step (resume with --load_checkpoint)."""


def main_guard(fn: Callable[[], None]) -> None:
    """Run a CLI, then tear down in order and exit with the code the run decided. Input errors end it with one
    line; the engines and process groups are torn down while the interpreter is intact and the exception's
    frames are gone, so that no communication thread outlives ``main`` to abort the process at exit."""
    shutdown(guarded(fn))


def guarded(fn: Callable[[], None]) -> int:
    """Run ``fn`` and return the exit code its outcome means (``main_guard``'s, without the exit)."""
    from xright.data import DataError
    from xright.models import ModelLoadError
    from xright.strategy import ConfigError
    from xright.trainer import NonFiniteLoss

    try:
        fn()
        return EXIT_OK
    except (DataError, ConfigError, ModelLoadError, UsageError, NonFiniteLoss) as e:
        print(f"xright: error: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE if isinstance(e, NonFiniteLoss) else EXIT_USAGE
    except Terminated as e:
        print(f"xright: {e}", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_OK if e.code is None else EXIT_BUG
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:  # a bug: its traceback, and exit 1 rather than whatever finalisation makes of it
        import traceback

        traceback.print_exc()
        return EXIT_BUG


def shutdown(code: int) -> None:
    """Tear down (engines, process groups, their threads) and exit with ``code``."""
    sys.stdout.flush()
    sys.stderr.flush()
    if "xright.strategy" not in sys.modules:  # stopped before any process group (e.g. --help)
        sys.exit(code)
    from xright.strategy import close_process_group

    left = close_process_group()
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if left and main is not None and main.name.startswith("xright."):  # never inside a host process (pytest)
        # A group outlived the teardown (ZeRO-3: see close_process_group): interpreter finalisation could abort
        # on its threads and replace the code; all is written and flushed, so end without finalisation.
        if os.environ.get("XRIGHT_DEBUG_EXIT"):
            print(f"xright: {len(left)} gloo threads alive at exit ({', '.join(left)}): os._exit({code})",
                  file=sys.stderr, flush=True)
        import atexit

        atexit._run_exitfuncs()  # Python-level exit handlers (logging, wandb, tqdm) still run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
