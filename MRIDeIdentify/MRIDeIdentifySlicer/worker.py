"""The child process of a panel run: ``python -m MRIDeIdentifySlicer.worker FOLDER`` (Slicer's own Python).

``FOLDER`` holds ``job.json`` (what to run) and ``input.mha`` (and ``brain_mask.mha``), written by
``childprocess.py``. The engine's ``pipeline.deidentify`` runs here at full speed: the application's main thread,
which holds Python's lock while Qt idles, is another process. Each event is one JSON line appended to
``events.jsonl`` (``started``, ``ready``, ``progress``, then ``done`` or ``error``); the results are written as
``output.mha``, ``brain_mask_out.mha`` and ``face_mask.mha`` before ``done``. MetaImage keeps the grid to the last bit
and every voxel type. Nothing here imports Slicer.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, List

EVENTS = "events.jsonl"
JOB = "job.json"
INPUT, BRAIN_MASK = "input.mha", "brain_mask.mha"
OUTPUTS = {"image": "output.mha", "brain_mask": "brain_mask_out.mha", "face_mask": "face_mask.mha"}


def main(argv: List[str]) -> int:
    folder = Path(argv[0])
    with open(folder / EVENTS, "a", encoding="utf-8") as events:

        def emit(event: str, **fields: Any) -> None:
            events.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
            events.flush()

        emit("started", pid=os.getpid(), python=sys.version.split()[0])
        try:
            job = json.loads((folder / JOB).read_text(encoding="utf-8"))
            _endWhenOrphaned(job.get("parent_pid"))
            import SimpleITK as sitk

            from MRIDeIdentifyLib.errors import InputError
            from MRIDeIdentifyLib.pipeline import deidentify
        except BaseException as error:
            emit("error", kind="internal", message=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
            return 1
        emit("ready")
        try:
            image = sitk.ReadImage(str(folder / INPUT))
            brain = sitk.ReadImage(str(folder / BRAIN_MASK)) if job["brain_mask"] else None
            result = deidentify(
                image,
                job["method"],
                brain_mask=brain,
                **job["settings"],
                progress=lambda stage, fraction: emit("progress", stage=stage, fraction=fraction),
            )
            for name, path in OUTPUTS.items():
                sitk.WriteImage(getattr(result, name), str(folder / path), useCompression=False)
        except InputError as error:
            emit("error", kind="input", message=str(error))
            return 2
        except BaseException as error:
            emit("error", kind="internal", message=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
            return 1
        emit("done", device=result.device, provenance=result.provenance)
    return 0


def _endWhenOrphaned(parentPid, interval: float = 2.0) -> None:
    """End this process when the application that started it has gone (crashed or killed): a run nobody waits for
    must not hold the CPU or the GPU. POSIX only (Windows ends a cancelled child through its process tree)."""
    if not parentPid or os.name == "nt":
        return
    import threading

    def watch() -> None:
        while True:
            time.sleep(interval)
            try:
                os.kill(int(parentPid), 0)
            except ProcessLookupError:
                os._exit(3)
            except OSError:  # exists, owned by another user: still there
                pass

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
