"""`omniserve serve` in a process of its own, for the benchmarks that crash, signal or restart it."""

from __future__ import annotations

import subprocess
import sys
import threading


def start_serve(flags: list[str], ready: str = "omniserve: serving", timeout_s: float = 600.0,
                new_session: bool = False) -> subprocess.Popen:
    """`omniserve serve FLAGS`, once a line of its output holds `ready` (a server prints "omniserve: serving", the
    router of --instances "routing to"). A server that does not get there in time is killed and the script exits
    with the end of its output. `new_session`: its own process group, so a signal to the benchmark does not reach
    it (a kill -9 is the benchmark's alone to send)."""
    server = subprocess.Popen([sys.executable, "-m", "omniserve", "serve", *flags], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=new_session)
    output: list[str] = []
    listening = threading.Event()

    def read() -> None:
        for line in server.stdout:
            output.append(line)
            if ready in line:
                listening.set()

    threading.Thread(target=read, daemon=True).start()
    if not listening.wait(timeout_s):
        server.kill()
        sys.exit("the server did not start:\n" + "".join(output[-30:]))
    return server
