"""
Tests for L{devpi_twisted.mirror.status}: the online / offline / probing
machine of a mirror, driven by a L{Clock}.

Every test ends by stopping the machine and checking that no timer is left
behind.
"""

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.mirror.status import MirrorStatus, StatusCore, makeMirrorStatus

START = 1_700_000_000.0


class MirrorStatusTests(SynchronousTestCase):
    """The status machine of one mirror."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.changes: list[tuple[str, str]] = []
        self.core = StatusCore(
            "root/pypi", self.clock, threshold=3, firstDelay=5.0, maxDelay=40.0,
            onTransition=lambda old, new: self.changes.append((old, new)),
        )
        self.status: MirrorStatus = makeMirrorStatus(self.core)

    def tearDown(self) -> None:
        self.status.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def state(self) -> str:
        return self.status.describe()["state"]

    def goOffline(self) -> None:
        for n in range(self.core.threshold):
            self.status.failed(f"failure {n}")
        self.assertEqual(self.state(), "offline")

    def test_startsOnline(self) -> None:
        """A new machine is online, asks upstream and reports empty figures."""
        self.assertTrue(self.status.mayAskUpstream())
        self.assertEqual(self.status.describe(), {
            "state": "online", "consecutive-failures": 0, "last-success": None,
            "last-failure": None, "last-error": None, "retry-delay": None,
        })
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_belowThreshold(self) -> None:
        """Fewer consecutive failures than the threshold keep the mirror online."""
        self.status.failed("one")
        self.status.failed("two")
        self.assertEqual(self.state(), "online")
        self.assertTrue(self.status.mayAskUpstream())
        self.assertEqual(self.status.describe()["consecutive-failures"], 2)
        self.assertEqual(self.changes, [])

    def test_successResetsCount(self) -> None:
        """A success in between resets the count, so failures must be consecutive."""
        self.status.failed("one")
        self.status.failed("two")
        self.clock.advance(1)
        self.status.succeeded()
        self.status.failed("three")
        self.status.failed("four")
        figures = self.status.describe()
        self.assertEqual(figures["state"], "online")
        self.assertEqual(figures["consecutive-failures"], 2)
        self.assertEqual(figures["last-success"], START + 1)

    def test_offlineAtThreshold(self) -> None:
        """The threshold-th consecutive failure takes the mirror offline, with the first delay."""
        self.status.failed("a")
        self.status.failed("b")
        self.clock.advance(2)
        self.status.failed("connection refused")
        self.assertFalse(self.status.mayAskUpstream())
        self.assertEqual(self.status.describe(), {
            "state": "offline", "consecutive-failures": 3, "last-success": None,
            "last-failure": START + 2, "last-error": "connection refused", "retry-delay": 5.0,
        })
        self.assertEqual(self.changes, [("online", "offline")])
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [START + 2 + 5.0])

    def test_offlineFailuresCounted(self) -> None:
        """Failures reported while offline are counted but change nothing else."""
        self.goOffline()
        self.status.failed("late")
        figures = self.status.describe()
        self.assertEqual(figures["state"], "offline")
        self.assertEqual(figures["consecutive-failures"], 4)
        self.assertEqual(figures["last-error"], "late")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_probingAfterDelay(self) -> None:
        """After the delay the mirror is probing: upstream may be asked again."""
        self.goOffline()
        self.clock.advance(4.9)
        self.assertEqual(self.state(), "offline")
        self.clock.advance(0.1)
        self.assertEqual(self.state(), "probing")
        self.assertTrue(self.status.mayAskUpstream())
        self.assertEqual(self.status.describe()["retry-delay"], 5.0)
        self.assertEqual(self.changes, [("online", "offline"), ("offline", "probing")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_probeSucceeds(self) -> None:
        """A success while probing brings the mirror online and resets the figures."""
        self.goOffline()
        self.clock.advance(5)
        self.status.succeeded()
        figures = self.status.describe()
        self.assertEqual(figures["state"], "online")
        self.assertEqual(figures["consecutive-failures"], 0)
        self.assertEqual(figures["last-success"], START + 5)
        self.assertIsNone(figures["retry-delay"])
        self.assertEqual(self.changes[-1], ("probing", "online"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_backoffDoublesToMax(self) -> None:
        """Each failed probe doubles the delay, up to the maximum."""
        self.goOffline()
        delays = []
        for _ in range(6):
            delay = self.status.describe()["retry-delay"]
            delays.append(delay)
            self.clock.advance(delay)
            self.assertEqual(self.state(), "probing")
            self.status.failed("still down")
            self.assertEqual(self.state(), "offline")
        self.assertEqual(delays, [5.0, 10.0, 20.0, 40.0, 40.0, 40.0])
        self.assertEqual(self.status.describe()["retry-delay"], 40.0)
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()],
                         [self.clock.seconds() + 40.0])

    def test_backoffStartsOverAfterRecovery(self) -> None:
        """Once online again, the next outage starts at the first delay."""
        self.goOffline()
        self.clock.advance(5)
        self.status.failed("down")
        self.assertEqual(self.status.describe()["retry-delay"], 10.0)
        self.clock.advance(10)
        self.status.succeeded()
        self.goOffline()
        self.assertEqual(self.status.describe()["retry-delay"], 5.0)

    def test_lateSuccessWhileOffline(self) -> None:
        """A request that started before the outage and then succeeds brings the mirror online."""
        self.goOffline()
        self.status.succeeded()
        self.assertEqual(self.state(), "online")
        self.assertTrue(self.status.mayAskUpstream())
        self.assertEqual(self.changes, [("online", "offline"), ("offline", "online")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopOnline(self) -> None:
        """Stopping an online machine leaves it stopped, asking nothing."""
        self.status.stop()
        self.assertEqual(self.state(), "stopped")
        self.assertFalse(self.status.mayAskUpstream())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopOffline(self) -> None:
        """Stopping an offline machine cancels its probe timer."""
        self.goOffline()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.status.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.state(), "stopped")

    def test_stopProbing(self) -> None:
        """Stopping a probing machine leaves no timer."""
        self.goOffline()
        self.clock.advance(5)
        self.status.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.state(), "stopped")

    def test_stoppedIgnoresNews(self) -> None:
        """After stop, successes and failures change nothing and start no timer."""
        self.status.stop()
        for _ in range(5):
            self.status.failed("x")
        self.status.succeeded()
        self.status.stop()
        self.assertEqual(self.state(), "stopped")
        self.assertEqual(self.status.describe()["consecutive-failures"], 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_transitionsLogged(self) -> None:
        """Going offline is a warning naming the mirror and the error; recovery is info."""
        with capturedLogs() as events:
            self.goOffline()
            self.clock.advance(5)
            self.status.succeeded()
        transitions: list[Any] = [e for e in events if "state" in e and e.get("mirror") == "root/pypi"]
        self.assertEqual([(e["old"], e["state"], e["log_level"]) for e in transitions], [
            ("online", "offline", LogLevel.warn),
            ("offline", "probing", LogLevel.info),
            ("probing", "online", LogLevel.info),
        ])
        self.assertEqual(transitions[0]["error"], "failure 2")
        self.assertEqual(self.core.transitions, ["offline", "probing", "online"])
