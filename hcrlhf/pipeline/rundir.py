"""The output directory of a pipeline run: its lock, its manifest, and a safe ``--overwrite``.

* **Lock** — ``<out>/hcrlhf_run.lock``, an exclusive POSIX ``flock`` (the approach of the δ ledger's
  ``<ledger>.lock``, but non-blocking) holding the pid, host and start time of the run that owns the
  directory. A second run on the same directory is refused at once, naming the owner. The kernel drops a
  ``flock`` when its process dies, so the lock file of a killed run is *stale*: the next run takes it over
  and says so. The file is removed when the run ends.
* **Manifest** — ``<out>/hcrlhf_run.json`` (format ``hcrlhf-run``) lists every top-level file and directory the
  run creates (each before it is created), its status (``running`` → ``finished`` | ``failed`` |
  ``interrupted``; ``running`` with no live lock = killed), the verdict and where the returned model is.
* **Overwrite** — only an earlier run's manifest entries are ever removed: a non-empty directory without a
  manifest is refused, and so is one holding an entry the earlier run did not create under a name this run
  would create. An earlier run that *returned a model* (``model/``) is never deleted: its entries and
  manifest are moved together to ``<out>/previous/<UTC time>/`` (a complete run directory: its model's
  relative paths still resolve there). Nothing is removed or moved until the run's inputs have loaded
  and its δ-ledger check passed (:meth:`RunDir.start`).
* **Resume** — ``RunDir(..., resume=True)`` takes over a run that did not finish (``running`` with a dead lock
  holder, ``failed``, ``interrupted``) in place: nothing is removed, its manifest is kept (``created``, ``started``)
  and a record is appended to its ``resumes`` list; the stages it finished are listed in ``completed``. A run that
  finished, a directory without a run, and ``resume`` with ``overwrite`` are refused. ``overwrite`` of a run that
  did not finish but holds RL checkpoints moves it aside to ``previous/<UTC time>/`` like a returned model: a
  checkpoint that could be resumed from is never deleted.
* **Nothing half-made** — a failure before :meth:`RunDir.start` removes the lock and any directory this
  run created; the output directory is left as it was found.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from hcrlhf.config import ConfigError

__all__ = ["RunDir", "FollowerRunDir", "RUN_MANIFEST", "RUN_LOCK", "RUN_FORMAT", "RUN_VERSION", "RUN_ENTRIES",
           "RETURNED_DIR", "CANDIDATE_DIR", "NOT_RETURNED_DIR", "NOT_RETURNED_NOTE", "PREVIOUS_DIR", "read_manifest"]

RUN_MANIFEST = "hcrlhf_run.json"
RUN_LOCK = "hcrlhf_run.lock"
RUN_FORMAT = "hcrlhf-run"
RUN_VERSION = 1
#: The returned model: exists only after a PASS.
RETURNED_DIR = "model"
#: The candidate while it is untested (and after `hcrlhf train`, which runs no test).
CANDIDATE_DIR = "candidate"
#: The candidate of a run whose safety test did not pass: kept for inspection only.
NOT_RETURNED_DIR = "candidate-not-returned"
#: The note in a candidate directory that holds no returned model.
NOT_RETURNED_NOTE = "NOT_RETURNED.md"
#: Where --overwrite moves an earlier run that returned a model.
PREVIOUS_DIR = "previous"
#: Every top-level name a run may create (the manifest lists those it did).
RUN_ENTRIES = ("config.yaml", "split.json", "holdout_prompts.jsonl", "sft_policy", "reward_model", "cost_model", "rl",
               CANDIDATE_DIR, RETURNED_DIR, NOT_RETURNED_DIR, "safety_test.json", "safety_samples.jsonl",
               "report.json", "report.md", "training.png", "safety_costs.png", "score_models.png")


def _say(message: str) -> None:
    print(f"[hcrlhf] {message}", file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json_atomic(path: Path, data: dict) -> None:
    """``path`` holds the old or the new JSON, never a mix (temp file in the same directory, then rename)."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=1) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _pid_alive(pid) -> bool | None:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return None
    return True


def read_manifest(directory) -> dict | None:
    """The run manifest of ``directory`` (``hcrlhf_run.json``), or None when there is none or it is not one."""
    path = Path(directory) / RUN_MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT or not isinstance(data.get("created"), list):
        return None
    return data


class _Lock:
    """The output directory's lock file, held with a non-blocking exclusive flock."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = None

    def acquire(self, info: dict) -> dict | None:
        """Take the lock; returns what a stale lock file (of a dead run) said, else None. Raises ConfigError
        naming the owner when another live process holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no flock; O_EXCL on the lock file instead
            return self._acquire_exclusive(info)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read()
                handle.close()
                raise ConfigError("output_dir", f"{str(self.path.parent)!r} is in use by another hcrlhf run "
                                                f"({_describe(owner)}; lock file {self.path.name}); wait for it to "
                                                "finish or choose another directory") from None
            # The file may have been removed (a run ending) between open() and flock(): lock the file that is
            # at the path now.
            try:
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        handle.seek(0)
        previous = handle.read().strip()
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(info) + "\n")
        handle.flush()
        self.handle = handle
        if not previous:
            return None
        try:
            stale = json.loads(previous)
        except ValueError:
            stale = {"raw": previous[:200]}
        return stale if isinstance(stale, dict) else {"raw": previous[:200]}

    def _acquire_exclusive(self, info: dict) -> dict | None:  # pragma: no cover - Windows only
        stale = None
        if self.path.exists():
            try:
                stale = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError:
                stale = {}
            if stale.get("host") == socket.gethostname() and _pid_alive(stale.get("pid")) is not False:
                raise ConfigError("output_dir", f"{str(self.path.parent)!r} is in use by another hcrlhf run "
                                                f"({_describe(json.dumps(stale))}); wait for it to finish or "
                                                "choose another directory")
            self.path.unlink()
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        self.handle = os.fdopen(fd, "w", encoding="utf-8")
        self.handle.write(json.dumps(info) + "\n")
        self.handle.flush()
        return stale

    def release(self) -> None:
        if self.handle is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked: a waiting opener re-checks the path (samestat above)
        with contextlib.suppress(OSError):
            self.handle.close()  # closing drops the flock
        self.handle = None


def _describe(owner_text: str) -> str:
    try:
        owner = json.loads(owner_text)
    except ValueError:
        return "owner unknown"
    if not isinstance(owner, dict):
        return "owner unknown"
    return f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"


class RunDir:
    """One run's hold on its output directory (see the module docstring for the rules).

    ``RunDir(path, overwrite=..., stages=...)`` checks the directory and takes its lock (ConfigError naming
    ``output_dir`` otherwise, leaving nothing behind); :meth:`start` replaces an earlier run and writes the
    manifest; :meth:`add` records entries before they are created; :meth:`finish` / :meth:`fail` close the
    manifest; :meth:`close` drops the lock (and, before :meth:`start`, what this object created).
    """

    def __init__(self, path, *, overwrite: bool, stages: str, version: str | None = None, resume: bool = False):
        self.path = Path(path).expanduser()
        self.overwrite, self.stages, self.version, self.resume = overwrite, stages, version, resume
        if resume and overwrite:
            raise ConfigError("resume", "cannot be combined with overwrite (--overwrite replaces the earlier run, "
                                        "--resume continues it); choose one")
        self.started = False
        self.manifest: dict | None = None
        self.earlier: dict | None = None
        self.previous: Path | None = None
        self._made: list[Path] = []  # directories this object created, deepest last
        self._lock = _Lock(self.path / RUN_LOCK)
        out = self.path
        if out.exists() and not out.is_dir():
            raise ConfigError("output_dir", f"{str(out)!r} exists and is not a directory")
        missing, parent = [], out
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        out.mkdir(parents=True, exist_ok=True)
        self._made = list(reversed(missing))
        try:
            stale = self._lock.acquire({"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                                        "argv": sys.argv[:8]})
            if stale is not None:
                _say(f"taking over the stale lock of {str(out)!r}: the run that held it "
                     f"({_describe(json.dumps(stale))}) is no longer running")
            self._check()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------ checks

    def _check(self) -> None:
        out = self.path
        for temp in out.glob(f".{RUN_MANIFEST}.*.tmp"):  # a manifest write cut short (we hold the lock)
            with contextlib.suppress(OSError):
                temp.unlink()
        present = sorted(p.name for p in out.iterdir() if p.name != RUN_LOCK)
        if not present and not self.resume:
            return
        earlier = read_manifest(out)
        if self.resume:
            self._check_resume(earlier)
            return
        if earlier is None:
            what = ("holds an hcrlhf_run.json that is not an hcrlhf run manifest" if RUN_MANIFEST in present else
                    "holds no hcrlhf_run.json of an earlier hcrlhf run (files of your own, or a report of an hcrlhf "
                    "older than the run manifest)")
            raise ConfigError("output_dir", f"{str(out)!r} is not empty and {what}; refusing to "
                                            f"{'overwrite' if self.overwrite else 'write into'} it (found: "
                                            f"{', '.join(present[:6])}{', ...' if len(present) > 6 else ''}). Choose a "
                                            "new directory, or move its contents away yourself")
        listed = self._listed(earlier)
        summary = (f"status {earlier.get('status')!r}, verdict {earlier.get('verdict')!r}"
                   + (", a returned model in model/" if self._returned(earlier) else ""))
        if not self.overwrite:
            unfinished = earlier.get("status") != "finished"
            raise ConfigError("output_dir", f"{str(out)!r} holds an earlier hcrlhf run ({summary}); "
                                            + ("it did not finish: continue it with resume (--resume), or " if
                                               unfinished else "")
                                            + "choose a new directory or set overwrite (--overwrite) to replace it (an "
                                            "earlier returned model is moved to previous/<time>/, never deleted)")
        foreign = [name for name in RUN_ENTRIES if (out / name).exists() and name not in listed]
        if foreign:
            raise ConfigError("output_dir", f"{str(out)!r} holds {', '.join(foreign)}, which the earlier hcrlhf run "
                                            "there did not create (its hcrlhf_run.json does not list them) and this "
                                            "run would write; refusing to overwrite them: move them away")
        self.earlier = earlier

    def _check_resume(self, earlier: dict | None) -> None:
        out = self.path
        if earlier is None:
            raise ConfigError("resume", f"{str(out)!r} holds no hcrlhf run to resume (no hcrlhf_run.json); nothing "
                                        "to resume")
        status = earlier.get("status")
        if status == "finished":
            raise ConfigError("resume", f"the run in {str(out)!r} finished (verdict {earlier.get('verdict')!r}); "
                                        "there is nothing to resume. Start a new run in a new directory (or use "
                                        "--overwrite to replace it)")
        if status not in ("running", "failed", "interrupted"):
            raise ConfigError("resume", f"the run in {str(out)!r} has status {status!r}, not one that can be resumed")
        if earlier.get("stages") != self.stages:
            raise ConfigError("resume", f"the run in {str(out)!r} ran stages {earlier.get('stages')!r}, this one "
                                        f"{self.stages!r}; resume it with the same command")
        self.earlier = earlier

    @staticmethod
    def _resumable(directory: Path) -> bool:
        """Whether ``directory`` (a run directory) holds an RL checkpoint a resumed run could continue from."""
        checkpoints = directory / "rl" / "checkpoints"
        return checkpoints.is_dir() and any(p.is_dir() and re.fullmatch(r"step-\d+", p.name)
                                            for p in checkpoints.iterdir())

    @staticmethod
    def _listed(manifest: dict) -> list[str]:
        """The manifest's entries this module may remove: only plain names a run creates."""
        return [name for name in manifest.get("created", []) if isinstance(name, str) and name in RUN_ENTRIES]

    def _returned(self, manifest: dict, root: Path | None = None) -> bool:
        root = self.path if root is None else root
        return RETURNED_DIR in self._listed(manifest) and (root / RETURNED_DIR).exists()

    # ------------------------------------------------------------------------------------ the run

    def start(self) -> None:
        """The run's real work begins: replace an earlier run (moving a returned model aside), then write this
        run's manifest (status ``running``)."""
        out = self.path
        if self.resume:
            self._start_resumed()
            return
        if self.earlier is not None:
            listed = [name for name in self._listed(self.earlier) if (out / name).exists() or (out / name).is_symlink()]
            keep = self.earlier.get("status") != "finished" and "rl" in listed and self._resumable(out)
            unknown = self._unknown_files(self.earlier, listed)
            if self._returned(self.earlier) or keep or unknown:
                stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                target, n = out / PREVIOUS_DIR / stamp, 1
                while target.exists():
                    n += 1
                    target = out / PREVIOUS_DIR / f"{stamp}-{n}"
                target.mkdir(parents=True)
                for name in listed:
                    os.replace(out / name, target / name)
                os.replace(out / RUN_MANIFEST, target / RUN_MANIFEST)  # last: until here the earlier run is listed
                self.previous = target
                what = ("returned a model" if self._returned(self.earlier) else
                        f"did not finish (status {self.earlier.get('status')!r}) and holds RL checkpoints it could be "
                        "resumed from (--resume)" if keep else
                        "holds files its inventory does not list (yours, or written after it finished: "
                        + ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "") + ")"
                        if self.earlier.get("files") is not None else
                        f"did not finish (status {self.earlier.get('status')!r}), so it has no inventory of its files "
                        "to tell them from yours")
                _say(f"overwrite: the earlier run in {str(out)!r} {what}; it was moved, with its report "
                     f"and score models, to {str(target)!r} (nothing of it was deleted)")
            else:
                for name in listed:
                    entry = out / name
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                (out / RUN_MANIFEST).unlink(missing_ok=True)  # last: until here the earlier run is listed
                _say(f"overwrite: removed the earlier run's {len(listed)} entries in {str(out)!r} (status "
                     f"{self.earlier.get('status')!r}, verdict {self.earlier.get('verdict')!r}: it returned no model; "
                     "files it did not create are kept)")
        self.manifest = {"format": RUN_FORMAT, "version": RUN_VERSION, "hcrlhf": self.version, "stages": self.stages,
                         "status": "running", "started": _now(), "finished": None, "pid": os.getpid(),
                         "host": socket.gethostname(), "verdict": None, "returned_model": None, "candidate": None,
                         "created": [], "completed": {}, "resumes": [],
                         "previous_run": None if self.previous is None else self.previous.relative_to(out).as_posix(),
                         "error": None,
                         "note": "written by hcrlhf as the run goes; 'created' lists what the run made here (all "
                                 "that `--overwrite` may remove); status 'running' without a live "
                                 "hcrlhf_run.lock means the run was killed"}
        self.started = True
        self._made = []  # from now on the directory is the run's: never removed
        self._write()

    def _start_resumed(self) -> None:
        """Continue the earlier run's manifest: nothing is removed; status ``running`` again, a ``resumes`` record."""
        earlier = self.earlier
        manifest = dict(earlier)
        manifest.setdefault("completed", {})
        resumes = list(manifest.get("resumes") or [])
        resumes.append({"at": _now(), "previous_status": earlier.get("status"),
                        "previous_error": earlier.get("error"), "previous_pid": earlier.get("pid"),
                        "previous_host": earlier.get("host"), "rl_from_step": None,
                        "completed_stages": sorted(manifest["completed"])})
        manifest.update(status="running", finished=None, error=None, pid=os.getpid(), host=socket.gethostname(),
                        hcrlhf=self.version, resumes=resumes)
        self.manifest = manifest
        self.started = True
        self._made = []
        self._write()
        _say(f"resume: continuing the run in {str(self.path)!r} (it was {earlier.get('status')!r}; stages it "
             f"finished: {', '.join(sorted(manifest['completed'])) or 'none'})")

    @property
    def completed(self) -> dict:
        """{stage: summary} of the stages this run (and the runs it resumes) finished."""
        return {} if self.manifest is None else self.manifest.setdefault("completed", {})

    def complete(self, stage: str, summary) -> None:
        """Record that ``stage`` finished (its outputs are on disk), with its report summary: a resumed run
        reuses it."""
        if self.manifest is not None:
            self.manifest.setdefault("completed", {})[stage] = summary
            self._write()

    def resumed(self, **fields) -> None:
        """Add ``fields`` to the newest ``resumes`` record (no-op when this run is no resumption)."""
        if self.manifest is not None and self.resume and self.manifest.get("resumes"):
            self.manifest["resumes"][-1].update(fields)
            self._write()

    def add(self, *names: str) -> None:
        """Record entries (top-level names of RUN_ENTRIES) before they are created."""
        if self.manifest is None:
            raise RuntimeError("RunDir.add before start()")
        new = False
        for name in names:
            if name not in RUN_ENTRIES:
                raise ValueError(f"RunDir.add: {name!r} is not a run entry")
            if name not in self.manifest["created"]:
                self.manifest["created"].append(name)
                new = True
        if new:
            self._write()

    def update(self, **fields) -> None:
        if self.manifest is not None:
            self.manifest.update(fields)
            self._write()

    def _inventory(self, names) -> list[str]:
        """Every file (and symlink) under the entries ``names``, as paths relative to the run directory."""
        found = []
        for name in names:
            entry = self.path / name
            if entry.is_dir() and not entry.is_symlink():
                found += [p.relative_to(self.path).as_posix() for p in entry.rglob("*")
                          if p.is_symlink() or not p.is_dir()]
            elif entry.exists() or entry.is_symlink():
                found.append(name)
        return sorted(found)

    def _unknown_files(self, manifest: dict, listed: list[str]) -> list[str]:
        """The files under the earlier run's entries that its inventory (``files``, written when it finished) does
        not list — a user's own notes put inside ``rl/``, say; all of them when there is no inventory (a run that
        did not finish). ``--overwrite`` deletes an earlier run only when this is empty, and moves it otherwise."""
        present = self._inventory(listed)
        known = manifest.get("files")
        if not isinstance(known, list):
            return present
        known = set(known)
        return [path for path in present if path not in known]

    def finish(self, *, verdict, returned_model, candidate) -> None:
        if self.manifest is None:
            return
        self.manifest["created"] = [n for n in self.manifest["created"] if (self.path / n).exists()]
        # The inventory that lets a later --overwrite tell this run's files from files a user adds afterwards.
        self.manifest["files"] = self._inventory(self.manifest["created"])
        self.update(status="finished", finished=_now(), verdict=verdict, returned_model=returned_model,
                    candidate=candidate)

    def fail(self, error: BaseException) -> None:
        """A failure: after :meth:`start` the manifest says the run did not finish; before it, nothing stays."""
        if self.manifest is None:
            return
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        with contextlib.suppress(OSError):
            self.update(status=status, finished=_now(), error=f"{type(error).__name__}: {error}"[:2000])

    def close(self) -> None:
        """Drop the lock; before :meth:`start`, also remove the directories this object created (if empty)."""
        self._lock.release()
        if not self.started:
            for directory in reversed(self._made):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            self._made = []

    def _write(self) -> None:
        _write_json_atomic(self.path / RUN_MANIFEST, self.manifest)


class FollowerRunDir:
    """The run directory as a rank other than 0 sees it under ``torchrun``: the same path, and no writes (rank 0
    holds the :class:`RunDir`: its lock, manifest and stage records; the pipeline shares with the other ranks what
    they need to know, such as the stages a resumed run may reuse)."""

    def __init__(self, path, *, resume: bool = False):
        self.path, self.resume = Path(path).expanduser(), resume
        self.manifest: dict | None = None
        self.previous: Path | None = None
        self.completed: dict = {}

    def __getattr__(self, name):  # start, add, complete, resumed, update, finish, fail, close: rank 0's work
        if name in ("start", "add", "complete", "resumed", "update", "finish", "fail", "close"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)
