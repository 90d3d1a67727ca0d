"""
What a new user sees when the first start goes wrong: one line that says
what is wrong and what to write instead, no traceback, no whole --help, and a
server directory left alone (so root's generated password is still shown on
the first start that works).  The twistd cases run the real command.
"""

import io
import os
import socket
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.admin import cli

from .serverprocess import TWISTD, environment, freePort, readText, tool

TIMEOUT = 60


class _TwistdCase(SynchronousTestCase):
    def setUp(self) -> None:
        tool("twistd")
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.serverdir = os.path.join(self.workdir, "server")

    def twistd(self, *options: str) -> tuple[int, str]:
        """Run C{twistd -n devpi} to its end: exit status and everything it wrote."""
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "devpi", "--serverdir", self.serverdir, "--no-root-pypi", *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.workdir, env=environment(self.workdir), timeout=TIMEOUT,
        )
        return result.returncode, result.stdout.decode("utf-8", "replace")

    def assertOneLine(self, options: list[str], line: str) -> None:
        """The command fails with exactly this line and leaves no server directory."""
        status, output = self.twistd(*options)
        self.assertEqual((status, output), (1, line + "\n"))
        self.assertFalse(os.path.exists(self.serverdir), os.listdir(self.workdir))


class BusyPortTests(_TwistdCase):
    """A first start on a port in use."""

    def test_busyPortKeepsDirectoryForTheNextStart(self) -> None:
        """One line naming the port and another to use; the next start that listens shows the password."""
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        self.assertOneLine(
            ["--listen", f"tcp:{port}:interface=127.0.0.1"],
            f"devpi-twisted: cannot listen on 127.0.0.1:{port}: the port is in use (another server?); "
            f"choose another port, e.g. --listen tcp:{port + 1}:interface=127.0.0.1",
        )
        # The first start that can listen initialises and shows the password.
        outputPath = os.path.join(self.workdir, "output.txt")
        with open(outputPath, "wb") as output:
            process = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "--logfile", os.path.join(self.workdir, "twistd.log"), "devpi",
                 "--serverdir", self.serverdir, "--no-root-pypi", "--listen", f"tcp:{freePort()}:interface=127.0.0.1"],
                stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, env=environment(self.workdir),
            )
        self.addCleanup(lambda: (process.kill(), process.wait(timeout=30)))
        deadline = time.monotonic() + TIMEOUT
        while "generated password" not in readText(outputPath):
            self.assertIsNone(process.poll(), readText(outputPath))
            self.assertLess(time.monotonic(), deadline, readText(outputPath))
            time.sleep(0.1)
        self.assertIn("created user 'root' with the generated password", readText(outputPath))


class ListenSyntaxTests(_TwistdCase):
    """--listen values that are no Twisted endpoint."""

    def test_portOnly(self) -> None:
        self.assertOneLine(
            ["--listen", "3142"],
            "devpi-twisted: --listen '3142' is a port without an endpoint type: write "
            "tcp:3142:interface=127.0.0.1 (this machine only) or tcp:3142 (every interface)",
        )

    def test_hostAndPort(self) -> None:
        self.assertOneLine(
            ["--listen", "127.0.0.1:3142"],
            "devpi-twisted: --listen '127.0.0.1:3142' is an address, not an endpoint: write "
            "tcp:3142:interface=127.0.0.1",
        )

    def test_unknownParameter(self) -> None:
        self.assertOneLine(
            ["--listen", "tcp:3142:host=127.0.0.1"],
            "devpi-twisted: --listen 'tcp:3142:host=127.0.0.1': tcp: has no parameter 'host'; it takes "
            "PORT[:interface=ADDRESS][:backlog=N], e.g. tcp:3141:interface=127.0.0.1",
        )

    def test_unknownType(self) -> None:
        status, output = self.twistd("--listen", "http:3142")
        self.assertEqual(status, 1)
        self.assertEqual(output.count("\n"), 1, output)
        self.assertIn("unknown endpoint type 'http'; an endpoint is TYPE:ARGUMENTS, e.g. "
                      "tcp:3141:interface=127.0.0.1", output)
        self.assertFalse(os.path.exists(self.serverdir))


class OptionValueTests(_TwistdCase):
    """A bad option value: one line, not the whole --help."""

    def test_notANumber(self) -> None:
        self.assertOneLine(
            ["--max-connections", "lots"],
            "devpi-twisted: --max-connections 'lots': must be a whole number (see 'twistd devpi --help')",
        )

    def test_checkedValue(self) -> None:
        self.assertOneLine(
            ["--max-connections", "0"],
            "devpi-twisted: --max-connections must be positive (see 'twistd devpi --help')",
        )


class ConsoleScriptTests(SynchronousTestCase):
    """C{devpi-twisted}: usage errors in one line; gen-config and /tmp."""

    def main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        return cli.main(list(argv), out=out, err=err), out.getvalue(), err.getvalue()

    def test_usageErrorOneLine(self) -> None:
        self.assertEqual(
            self.main("gen-config", "--shutdown-grace", "soon"),
            (2, "", "devpi-twisted: --shutdown-grace 'soon': must be a number "
                    "(see 'devpi-twisted gen-config --help')\n"),
        )
        status, _, err = self.main()
        self.assertEqual((status, err.count("\n")), (2, 1))
        self.assertIn("a command is required: init, passwd, export, import, gen-config", err)

    def test_genConfigUnderTmp(self) -> None:
        """A server directory or venv under /tmp: PrivateTmp=no, and a warning for each."""
        out = os.path.abspath(self.mktemp())
        status, text, _ = self.main("gen-config", "--serverdir", "/tmp/devpi/server", "--venv", "/var/tmp/venv",
                                    "--out", out)
        self.assertEqual(status, 0)
        with open(os.path.join(out, "devpi-twisted.service")) as f:
            unit = f.read().splitlines()
        self.assertIn("PrivateTmp=no", unit)
        self.assertNotIn("PrivateTmp=yes", unit)
        for path in ("/tmp/devpi/server", "/var/tmp/venv"):
            self.assertIn(f"devpi-twisted: warning: {path} is under a temporary directory", text)

    def test_genConfigElsewhere(self) -> None:
        """Elsewhere the unit keeps PrivateTmp=yes and says nothing about it."""
        out = os.path.abspath(self.mktemp())
        status, text, _ = self.main("gen-config", "--serverdir", "/var/lib/devpi-twisted", "--venv", "/opt/venv",
                                    "--out", out)
        self.assertEqual(status, 0)
        with open(os.path.join(out, "devpi-twisted.service")) as f:
            self.assertIn("PrivateTmp=yes", f.read().splitlines())
        self.assertNotIn("temporary directory", text)
