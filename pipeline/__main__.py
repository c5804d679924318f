"""`python -m pipeline` and the `pipeline` console script."""

import _thread
import os
import signal
import sys
import threading

EXIT_INTERRUPTED = 130
SIGINT_SEEN = threading.Event()  # a Ctrl-C arrived while the command ran


def entry() -> None:
    """The CLI, with Ctrl-C handled where the CLI's own handler cannot be: while it is still being imported,
    and once its work is over (a late Ctrl-C must not turn a finished stage into a killed process)."""
    sys.unraisablehook = _redeliver_interrupts
    signal.signal(signal.SIGINT, _note_sigint)
    try:
        from pipeline.cli import main

        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _exit_interrupted()
    except Exception as e:
        if not _caused_by_interrupt(e):
            raise
        print("interrupted", file=sys.stderr)
        _exit_interrupted()
    except SystemExit as e:
        if e.code == EXIT_INTERRUPTED:
            _exit_interrupted()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _note_sigint(signum, frame) -> None:
    """Python's own Ctrl-C (a KeyboardInterrupt where the main thread is), remembered."""
    SIGINT_SEEN.set()
    raise KeyboardInterrupt


def _caused_by_interrupt(error: BaseException) -> bool:
    """Whether a Ctrl-C is in `error`'s chain of causes: one that lands while an extension module initializes
    (scipy's, under transformers' lazy imports) surfaces as that import's ImportError, raised from it. One that
    lands inside C code can surface with no chain at all (safetensors reading a tensor raised a ValueError about a
    torch storage), so an error after a Ctrl-C arrived is its too."""
    if SIGINT_SEEN.is_set():
        return True
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _redeliver_interrupts(unraisable, default=sys.unraisablehook) -> None:
    """A Ctrl-C that lands inside a finalizer or weakref callback is printed and dropped by Python; hand it to
    the main thread again instead, so it stops the command as any other Ctrl-C does."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):  # from another thread, once this hook has returned
        threading.Timer(0.05, _thread.interrupt_main).start()
    else:
        default(unraisable)


def _exit_interrupted() -> None:
    """Exit 130 now. CPython 3.11 remembers a KeyboardInterrupt raised inside exec()'d code (dataclasses, torch's
    imports) even once it was handled, and would end the process by SIGINT at shutdown instead of exiting 130."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    entry()
