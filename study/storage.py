"""Studies whose storage is an object store (``s3://...``, ``gs://...``, ``hdfs://...``).

A study always has a local directory (the "mirror", ``<workdir>/<name>``):
the driver writes its spec, the MLflow sqlite store, the Parquet tables and
the report there. With remote storage the study's *home* is the URI
``<storage>/<name>``:

* Ray Tune writes its experiment state and every trial's results and
  checkpoints to ``<home>/ray`` (so trials on any node persist their
  checkpoints without a shared filesystem);
* the driver copies its own files (``spec.yaml``, ``study.json``, a
  snapshot of ``mlflow.db`` and ``optuna.db``, ``mlartifacts/``, the Parquet tables)
  to ``<home>`` when the study starts, every ``OTSTUDY_SYNC_PERIOD_S``
  seconds (default 60) while it runs, and when it ends;
* ``otstudy resume|status|export|report URI`` on any machine pulls those files
  and the experiment's small files (states, ``result.json``, the final
  ``embeddings.npz``; never the model checkpoints, the trials read those from
  the store) into the mirror and works there.

URIs are opened with :func:`pyarrow.fs.FileSystem.from_uri`, the same
resolver Ray uses, so query options such as
``s3://bucket/studies?endpoint_override=host:9000&scheme=http`` (MinIO, a
local S3) work everywhere; credentials come from the usual environment
(``AWS_ACCESS_KEY_ID`` ...), which Ray passes on to its workers.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Tuple
from urllib.parse import urlparse, urlunparse

from .records import EMBEDDINGS_FILE

REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
HOME_FILES = ("spec.yaml", "study.json", "mlflow.db", "optuna.db", "results.parquet", "history.parquet")
SQLITE_FILES = ("mlflow.db", "optuna.db")  # copied as consistent snapshots
HOME_DIRS = ("mlartifacts",)


class StorageError(ValueError):
    """A storage URI that cannot be opened or read; the message is one line."""


def is_remote(location: Optional[str]) -> bool:
    return bool(location) and urlparse(str(location)).scheme in REMOTE_SCHEMES


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/x?endpoint_override=h", "name", "ray")`` -> ``s3://b/x/name/ray?endpoint_override=h``."""
    u = urlparse(uri)
    path = "/".join([u.path.rstrip("/")] + [p.strip("/") for p in parts if p])
    return urlunparse(u._replace(path=path))


def display(uri: str) -> str:
    """The URI without its query (no endpoint or option noise in messages)."""
    return urlunparse(urlparse(uri)._replace(query=""))


def open_fs(uri: str):
    """(pyarrow filesystem, path on it) for ``uri``, or a one-line :class:`StorageError`."""
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # unknown scheme, bad options, missing credentials
        raise StorageError(f"storage {display(uri)}: cannot be opened ({one_line(exc)})") from None
    return fs, path.rstrip("/")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


class Remote:
    """A study's home on an object store (``<storage>/<name>``)."""

    def __init__(self, home: str):
        self.home = home
        self.fs, self.path = open_fs(home)

    # -- queries
    def _info(self, rel: str):
        return self.fs.get_file_info(f"{self.path}/{rel}" if rel else self.path)

    def has_file(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        try:
            return self._info(rel).type == pafs.FileType.File
        except Exception as exc:
            raise StorageError(f"storage {display(self.home)}: cannot be read ({one_line(exc)})") from None

    def is_study(self) -> bool:
        return self.has_file("spec.yaml")

    @property
    def experiment_uri(self) -> str:
        return join(self.home, "ray")

    # -- transfers
    def _put(self, src: Path, rel: str) -> None:
        with open(src, "rb") as f, self.fs.open_output_stream(f"{self.path}/{rel}") as out:
            shutil.copyfileobj(f, out, length=1 << 20)

    def _get(self, rel: str, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".part")
        with self.fs.open_input_stream(f"{self.path}/{rel}") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
        os.replace(tmp, dst)

    def push_home(self, study_dir: Path) -> List[str]:
        """Copy the driver's files to the home; the sqlite stores as consistent snapshots. Returns
        the paths written, relative to the home."""
        study_dir = Path(study_dir)
        self.fs.create_dir(self.path)
        written = []
        for name in HOME_FILES:
            src = study_dir / name
            if not src.is_file():
                continue
            if name in SQLITE_FILES:
                with tempfile.TemporaryDirectory() as d:
                    snap = Path(d) / name
                    _sqlite_snapshot(src, snap)
                    self._put(snap, name)
            else:
                self._put(src, name)
            written.append(name)
        for dname in HOME_DIRS:
            for f in sorted((study_dir / dname).rglob("*")) if (study_dir / dname).is_dir() else []:
                if f.is_file():
                    rel = f.relative_to(study_dir).as_posix()
                    self.fs.create_dir(f"{self.path}/{Path(rel).parent.as_posix()}")
                    self._put(f, rel)
                    written.append(rel)
        return written

    def delete_home_files(self, names: Iterable[str]) -> None:
        """Remove files this study wrote to its home (best effort: a file left is only a file; the
        home is refused as an existing study only while its ``spec.yaml`` is there)."""
        for name in names:
            try:
                self.fs.delete_file(f"{self.path}/{name}")
            except OSError:
                pass

    def put_experiment_file(self, name: str, src: Path) -> None:
        """Replace one file at the top of ``<home>/ray`` (Tune's experiment directory)."""
        self._put(Path(src), f"ray/{name}")

    def pull_home(self, study_dir: Path) -> None:
        """Copy the home's driver files into ``study_dir`` (files already there are replaced)."""
        for name in HOME_FILES:
            if self.has_file(name):
                self._get(name, Path(study_dir) / name)
        for dname in HOME_DIRS:
            for rel in self._list(dname):
                self._get(rel, Path(study_dir) / rel)

    def _list(self, rel: str) -> Iterable[str]:
        import pyarrow.fs as pafs

        base = f"{self.path}/{rel}"
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except Exception as exc:
            raise StorageError(f"storage {display(self.home)}: cannot be listed ({one_line(exc)})") from None
        for info in infos:
            if info.type == pafs.FileType.File:
                yield f"{rel}/{info.path[len(base):].lstrip('/')}"

    def pull_experiment(self, study_dir: Path) -> int:
        """Mirror ``<home>/ray`` into ``study_dir/ray`` without the model checkpoints.

        Every small file (experiment and searcher state, ``params.json``,
        ``result.json``, errors) is refreshed; of the checkpoint directories only
        ``embeddings.npz`` (the final frozen features, for the report) is copied,
        once. A trial directory that holds only checkpoints (a trial the driver
        started shortly before it died: its results had not been synced yet) is
        mirrored as an empty directory, so the resume's repairs see every trial
        the local storage would show. Returns the number of files copied.
        """
        n = 0
        local = Path(study_dir)
        for rel in self._list("ray"):
            parts = rel.split("/")
            ckpt = next((i for i, p in enumerate(parts) if p.startswith("checkpoint_")), None)
            if ckpt is not None and (parts[-1] != EMBEDDINGS_FILE or (local / rel).exists()):
                (local / "/".join(parts[:ckpt])).mkdir(parents=True, exist_ok=True)
                continue
            self._get(rel, local / rel)
            n += 1
        return n


def _sqlite_snapshot(src: Path, dst: Path) -> None:
    """A consistent copy of a live sqlite database (the online backup API, not a file copy)."""
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30) as s, sqlite3.connect(dst) as d:
        s.backup(d)


# --------------------------------------------------------------------------- study locations


def remote_of(study_dir: Path) -> Optional[Remote]:
    """The study's home when it has remote storage (recorded in ``study.json``), else None."""
    f = Path(study_dir) / "study.json"
    if not f.is_file():
        return None
    try:
        home = json.loads(f.read_text()).get("remote")
    except json.JSONDecodeError:
        return None
    return Remote(home) if home else None


def materialize(location: str, workdir: str = "studies", *, refresh: bool = True) -> Tuple[Path, Optional[Remote]]:
    """A local study directory for ``location`` (a study directory or a study's home URI).

    For a URI the home's files are pulled into ``<workdir>/<name>`` (created
    if needed); with ``refresh`` the experiment's small files are mirrored too,
    so status, export and report see what the trials have written so far.
    """
    if is_remote(location):
        remote = Remote(location)
        if not remote.is_study():
            raise StorageError(f"{display(location)} is not an otstudy study (no spec.yaml there)")
        name = urlparse(location).path.rstrip("/").rsplit("/", 1)[-1]
        local = Path(workdir).expanduser() / name
        if local.exists() and (local / "study.json").is_file():
            mine = remote_of(local)
            if mine is None or display(mine.home) != display(location):
                raise StorageError(f"{local} already holds another study; pass --workdir to mirror "
                                   f"{display(location)} elsewhere")
        local.mkdir(parents=True, exist_ok=True)
        remote.pull_home(local)
        _record_home(local, location)  # the URI with its options, as given on this machine
    else:
        local = Path(location)
        remote = remote_of(local)
    if remote is not None and refresh:
        remote.pull_experiment(local)
    return local, remote


def _record_home(study_dir: Path, home: str) -> None:
    """Note the home URI (with this machine's options) and point the embedded MLflow store here."""
    f = study_dir / "study.json"
    meta = json.loads(f.read_text()) if f.is_file() else {}
    new = dict(meta, remote=home)
    uri = str(meta.get("tracking_uri", ""))
    if uri.startswith("sqlite:///") and uri.endswith("/mlflow.db"):  # the embedded store, made elsewhere
        new["tracking_uri"] = f"sqlite:///{(study_dir / 'mlflow.db').resolve()}"
    if new != meta:
        f.write_text(json.dumps(new, indent=2))
