"""``python -m loratools``. Until the command's own handlers are in place (cli.main), Ctrl-C,
SIGTERM or SIGHUP while the modules load ends the process with one line and no traceback
(nothing has been written yet)."""
import signal
import sys


def _while_loading(signum, frame):
    what = "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"
    sys.stderr.write(f"loratools: {what}\n")
    raise SystemExit(128 + signum)


_SIGNALS = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
_old = {s: signal.signal(s, _while_loading) for s in _SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}

from .cli import entry  # noqa: E402 - after the handlers

for _s, _h in _old.items():
    signal.signal(_s, _h if _h is not None else signal.SIG_DFL)

entry()
