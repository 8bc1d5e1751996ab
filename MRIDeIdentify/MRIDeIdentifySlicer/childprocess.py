"""A de-identification in a child process, as the panel runs it.

Inside Slicer the main thread holds Python's lock while Qt idles (CTK starts PythonQt without thread support), so a
worker *thread* only runs when the main thread lets it: the engine would crawl. A child process (Slicer's
``PythonSlicer``, or this Python outside the application) runs it at full speed instead. The input goes to it as
temporary files that keep the grid and the voxel type exactly; it appends one JSON line per event to a file that
:meth:`ChildRun.poll` reads without ever blocking (no pipe to drain, no thread); Cancel ends the process (and the
interpreter the ``PythonSlicer`` launcher started) at once; the results are read back by the caller, in the main
thread, once the child has finished. Nothing here touches a node: ``nodes.py`` does that.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

from . import worker
from .messages import inPanelTerms

PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # the module's folder: the child imports both packages from it


class ChildResult(NamedTuple):
    """The engine's ``pipeline.Result`` read back from the child's files."""

    image: Any
    brain_mask: Any
    face_mask: Any
    provenance: Dict[str, Any]
    device: str


def pythonExecutable() -> str:
    """Slicer's ``PythonSlicer`` inside the application (what ``sys.executable`` names there is the application
    itself on some platforms), this interpreter elsewhere."""
    try:
        import slicer

        inApplication = hasattr(slicer, "app")
    except ImportError:
        inApplication = False
    return (shutil.which("PythonSlicer") or sys.executable) if inApplication else sys.executable


class ChildRun:
    """One run of ``worker.py`` on temporary files. Create it with :meth:`start`; call :meth:`poll` from a timer,
    then :meth:`result` once :meth:`finished`; :meth:`cancel` ends it at once. :meth:`close` removes the files."""

    def __init__(self, folder: Path, process: subprocess.Popen, started: float):
        self.folder, self.process, self.started = folder, process, started
        self.stage, self.fraction = "starting", 0.0
        self.events: List[Dict[str, Any]] = []
        self.cancelled = False
        self.ended: Optional[float] = None  # when the process was seen to have ended (perf_counter)
        self._offset = 0

    @classmethod
    def start(
        cls, image, method: Optional[str], settings: Dict[str, Any], brainMask=None, python: Optional[str] = None
    ) -> "ChildRun":
        """Write ``image`` (and ``brainMask``, SimpleITK images) and ``settings`` (``pipeline.deidentify``'s
        keyword arguments: margin_mm, seed, device, options) to a new temporary folder and start the child."""
        import SimpleITK as sitk

        folder = Path(tempfile.mkdtemp(prefix="MRIDeIdentify-"))
        try:
            sitk.WriteImage(image, str(folder / worker.INPUT), useCompression=False)
            if brainMask is not None:
                sitk.WriteImage(brainMask, str(folder / worker.BRAIN_MASK), useCompression=False)
            job = {
                "method": method,
                "brain_mask": brainMask is not None,
                "settings": settings,
                "parent_pid": os.getpid(),
            }
            (folder / worker.JOB).write_text(json.dumps(job), encoding="utf-8")
            log = open(folder / "log.txt", "wb")
            started = time.perf_counter()
            process = subprocess.Popen(
                [python or pythonExecutable(), "-m", "MRIDeIdentifySlicer.worker", str(folder)],
                cwd=str(PACKAGE_PARENT),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **_ownProcessGroup(),
            )
            log.close()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(folder, process, started)

    def poll(self) -> List[Dict[str, Any]]:
        """The events the child wrote since the last call (never blocks); updates :attr:`stage` and :attr:`fraction`."""
        path = self.folder / worker.EVENTS
        if self.cancelled or not path.is_file():
            return []
        with open(path, "rb") as events:
            events.seek(self._offset)
            chunk = events.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written is read next time
        self._offset += len(complete)
        new = [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]
        for event in new:
            event["received"] = time.perf_counter()
            if event["event"] == "progress":
                self.stage, self.fraction = event["stage"], float(event["fraction"])
        self.events += new
        return new

    def finished(self) -> bool:
        """The child has ended (done, failed or cancelled) and its last events have been read."""
        if self.process.poll() is None:
            return False
        if self.ended is None:
            self.ended = time.perf_counter()
        self.poll()
        return True

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> bool:
        """Poll until the child ends (scripts and tests; the panel polls from a timer instead)."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self.finished():
            if deadline is not None and time.perf_counter() > deadline:
                return False
            self.poll()
            time.sleep(interval)
        return True

    def cancel(self) -> None:
        """End the child now, the interpreter a launcher started included; its results are not wanted."""
        self.cancelled = True
        if self.process.poll() is None:
            _killTree(self.process)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def startupSeconds(self) -> Optional[float]:
        """From the start of the child to the engine imported in it (``ready``), as seen by this process."""
        ready = next((event for event in self.events if event["event"] == "ready"), None)
        return None if ready is None else ready["received"] - self.started

    def result(self) -> ChildResult:
        """The results, read back (call in the main thread once :meth:`finished`). Raises ``errors.Cancelled``,
        ``errors.InputError`` (in the panel's words) or RuntimeError with the child's log."""
        from MRIDeIdentifyLib.errors import Cancelled, InputError

        if self.cancelled:
            raise Cancelled("de-identification cancelled")
        if not self.finished():
            raise RuntimeError("The de-identification is still running.")
        last = self.events[-1] if self.events else {}
        if last.get("event") == "error":
            if last.get("kind") == "input":
                raise InputError(inPanelTerms(last["message"]))
            raise RuntimeError(f"{last['message']}\n\n{last.get('traceback', '')}")
        if last.get("event") != "done":
            raise RuntimeError(
                f"The de-identification process stopped unexpectedly (exit code "
                f"{self.process.returncode}). Its last output:\n{self.logTail()}"
            )
        import SimpleITK as sitk

        images = {name: sitk.ReadImage(str(self.folder / path)) for name, path in worker.OUTPUTS.items()}
        return ChildResult(
            images["image"], images["brain_mask"], images["face_mask"], last["provenance"], last["device"]
        )

    def logTail(self, lines: int = 20) -> str:
        path = self.folder / "log.txt"
        text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Remove the temporary files (ending the child first if it still runs)."""
        if self.process.poll() is None:
            self.cancel()
        shutil.rmtree(self.folder, ignore_errors=True)


def _ownProcessGroup() -> Dict[str, Any]:
    """Start the child in a process group of its own, so that Cancel can end it with everything it started."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _killTree(process: subprocess.Popen) -> None:
    """``PythonSlicer`` is a launcher that starts the real interpreter as its own child: ending the launcher alone
    would leave the engine running, so the whole group (POSIX) or tree (Windows) is ended."""
    if os.name == "nt":
        subprocess.run(
            ["taskkill", "/F", "/T", "/PID", str(process.pid)],
            capture_output=True,
            creationflags=subprocess.CREATE_NO_WINDOW,
        )
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process.poll() is None:
        process.kill()
