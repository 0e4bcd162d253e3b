"""Benchmark: pulling from a local registry, pull-to-running, and ``pcd run --rm`` latency.

The figures of issue 5's performance section, measured in one run on this machine with
Debian's ``docker-registry`` on 127.0.0.1 (plain HTTP, filesystem storage in a temp dir):

- pull: the ~200 MB image of ``bench_images`` (three layers of random bytes, gzip) pushed
  once as ``bench/big``, then pulled by ``pcd pull`` (which unpacks) into our daemon,
  by ``ctr images pull`` and by ``ctr content fetch`` (content only, no unpack) into our
  daemon and into Debian's containerd 1.6, and copied by ``skopeo copy`` to a fresh OCI
  directory (download only: the machine's floor for fetching; also shown with the
  ``sync`` after it, since the daemons fsync each blob and skopeo does not). MB/s =
  compressed image size / wall time. Between runs the image goes with ``ctr images rm
  --sync`` and the daemon's content and snapshots are checked empty, so every pull
  downloads and unpacks everything again; every timed run starts after ``sync`` and the
  order of the contenders rotates.
- pull-to-running: ``pcd run --rm --pull always`` of ``bench/bigrun`` (the same three
  layers over a busybox layer) running ``true``, from the command's start to its exit;
  beside containerd's ``ctr images pull`` then ``ctr run --rm`` of the same image.
- run: ``pcd run --rm --network none IMG true`` wall time beside ``ctr run --rm
  --runtime io.containerd.pyrunc.v1 IMG id true`` against the same daemon (``ctr run``
  gives the container an empty network namespace too), and containerd's ``ctr run --rm``
  (runc.v2) for reference, and ``pcd --help`` for the CLI's start-up alone; interleaved.

    .venv/bin/python -m tests.bench.bench_pull [--quick] [--no-containerd]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycontainerd.network import unmount_netns_dir
from tests.bench.bench_core import QuietDaemon
from tests.bench.bench_images import MB, Inputs, build_inputs, rotations
from tests.bench.common import CONFIG, cpu_seconds, percentile
from tests.client.registry_support import REGISTRY, SKOPEO, RegistryServer
from tests.support.containerd import CONTAINERD, Containerd
from tests.support.daemon import CTR, Daemon
from tests.support.images import busybox_image, chain_id, sha256_digest, write_oci_archive

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

NS = "bench"
SNAPSHOTTER = "overlayfs"
BUSYBOX_REF = "example.com/bench/busybox:1"
PYRUNC = "io.containerd.pyrunc.v1"
PCD_SCRIPT = Path(sys.executable).parent / "pcd"
# The console script if installed, else the module: both are what a user would run.
PCD_CMD = [str(PCD_SCRIPT)] if PCD_SCRIPT.exists() else [sys.executable, "-m", "pycontainerd.cli"]
PCD_PULL, CTR_OURS, CTR_THEIRS, FETCH_OURS, FETCH_THEIRS, SKOPEO_COPY, SKOPEO_SYNC = (
    "pcd pull -> pycontainerd",
    "ctr images pull -> pycontainerd",
    "ctr images pull -> containerd 1.6",
    "ctr content fetch (no unpack) -> pycontainerd",
    "ctr content fetch (no unpack) -> containerd 1.6",
    "skopeo copy -> OCI dir (no unpack)",
    "  same, then sync (data on disk)",
)


@dataclass(frozen=True)
class Plan:
    pull_runs: int = 3
    to_running_runs: int = 3
    run_runs: int = 15


QUICK = Plan(pull_runs=2, to_running_runs=2, run_runs=8)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class Sample:
    wall: float
    client_cpu: float = 0.0
    daemon_cpu: float = 0.0


def run_cmd(argv: list[str], env: dict[str, str] | None = None, timeout: float = 300.0) -> str:
    res = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res.stdout


def timed(
    argvs: list[list[str]],
    daemon: Daemon | None,
    env: dict[str, str] | None = None,
    sync: bool = True,
) -> Sample:
    """Wall time of ``argvs`` run one after the other, with client and daemon CPU time."""
    if sync:
        os.sync()  # dirty pages of the previous run would otherwise be flushed on our time
    pid = daemon.proc.pid if daemon is not None and daemon.proc is not None else None
    c0 = cpu_seconds(pid) if pid else 0.0
    k0, t0 = _children_cpu(), time.perf_counter()
    for argv in argvs:
        run_cmd(argv, env)
    wall = time.perf_counter() - t0
    return Sample(wall, _children_cpu() - k0, (cpu_seconds(pid) - c0) if pid else 0.0)


# --- the setting -------------------------------------------------------------------------


class Bench:
    """The registry, our daemon, containerd (optional) and the pcd client's directories."""

    def __init__(self, with_containerd: bool) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="pcd-bpull-", dir="/tmp"))
        self.registry = RegistryServer()
        self.ours: Daemon = QuietDaemon(config=CONFIG)
        self.theirs: Daemon | None = Containerd() if with_containerd else None
        self.env = self.ours.env()
        self.env.pop("PCD_INSECURE_REGISTRIES", None)

    def start(self) -> Bench:
        self.registry.start()
        self.ours.start()
        if self.theirs is not None:
            self.theirs.start()
        return self

    def cleanup(self) -> None:
        for d in (self.ours, self.theirs):
            if d is not None:
                d.cleanup()
        self.registry.cleanup()
        # `pcd run` made its network namespaces under the exec root: unmount before removing.
        unmount_netns_dir(self.scratch / "exec" / "netns")
        shutil.rmtree(self.scratch, ignore_errors=True)

    @property
    def host(self) -> str:
        return self.registry.host

    def pcd(self, *args: str) -> list[str]:
        return [
            *PCD_CMD, "-a", self.ours.address, "-n", NS,
            "--data-root", str(self.scratch / "data"), "--exec-root", str(self.scratch / "exec"),
            *args,
        ]  # fmt: skip

    @staticmethod
    def ctr(d: Daemon, *args: str) -> list[str]:
        assert CTR is not None
        return [CTR, "-a", d.address, "-n", NS, *args]

    def remove_image(self, d: Daemon, ref: str) -> None:
        """``images rm --sync``, then check nothing is left for the next pull to reuse."""
        run_cmd(self.ctr(d, "images", "rm", "--sync", ref))
        left = run_cmd(self.ctr(d, "content", "ls", "-q")).split()
        snaps = run_cmd(self.ctr(d, "snapshots", "--snapshotter", SNAPSHOTTER, "ls"))
        left += [line.split()[0] for line in snaps.splitlines()[1:]]
        if left:
            raise RuntimeError(f"{d.address}: images rm --sync left {left[:4]}")

    def check_unpacked(self, d: Daemon, chain: str) -> None:
        run_cmd(self.ctr(d, "snapshots", "--snapshotter", SNAPSHOTTER, "info", chain))


@contextlib.contextmanager
def bench(with_containerd: bool) -> Iterator[Bench]:
    b = Bench(with_containerd)
    try:
        yield b.start()
    finally:
        b.cleanup()


# --- images in the registry ----------------------------------------------------------------


def _archive_blob(archive: Path, digest: str) -> bytes:
    with tarfile.open(archive) as tf:
        f = tf.extractfile(f"blobs/sha256/{digest.split(':', 1)[1]}")
        assert f is not None
        return f.read()


def _http(method: str, url: str, data: bytes | None = None, ctype: str = "") -> tuple[int, str]:
    """(status, Location header) of one request to the registry."""
    headers = {"Content-Type": ctype} if ctype else {}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
        return int(r.status), str(r.headers.get("Location", ""))


def _upload(base: str, data: bytes) -> None:
    """A monolithic blob upload (POST, then PUT with the digest)."""
    status, loc = _http("POST", f"{base}/blobs/uploads/")
    if status != 202:
        raise RuntimeError(f"upload start -> {status}")
    url = urllib.parse.urljoin(base, loc)
    sep = "&" if "?" in url else "?"
    digest = urllib.parse.quote(sha256_digest(data))
    _http("PUT", f"{url}{sep}digest={digest}", data, "application/octet-stream")


def push_images(b: Bench, inputs: Inputs) -> tuple[str, str, str]:
    """Push ``bench/big`` and ``bench/bigrun``; (big ref, bigrun ref, bigrun chain id).

    ``bench/big`` goes up with skopeo from the archive. ``bench/bigrun`` is made in the
    registry directly: the three big layers mounted from ``bench/big``, under busybox's
    layer (so ``true`` runs), with the config's diff_ids to match.
    """
    assert SKOPEO is not None
    big, bigrun = f"{b.host}/bench/big:latest", f"{b.host}/bench/bigrun:latest"
    run_cmd(
        [SKOPEO, "copy", "--quiet", "--dest-tls-verify=false",
         f"oci-archive:{inputs.archive}", f"docker://{big}"]
    )  # fmt: skip
    manifest = json.loads(_archive_blob(inputs.archive, inputs.manifest))
    config = json.loads(_archive_blob(inputs.archive, manifest["config"]["digest"]))
    bb = busybox_image().layer_blobs[0]
    diff_ids = [bb.diff_id, *config["rootfs"]["diff_ids"]]
    config["rootfs"]["diff_ids"] = diff_ids
    config["history"] = [{"created_by": "busybox"}, *config.get("history", [])]
    config_bytes = json.dumps(config, sort_keys=True).encode()
    base = f"http://{b.host}/v2/bench/bigrun"
    for layer in manifest["layers"]:
        status, _ = _http("POST", f"{base}/blobs/uploads/?mount={layer['digest']}&from=bench/big")
        if status != 201:
            raise RuntimeError(f"mount of {layer['digest']} -> {status}")
    _upload(base, bb.data)
    _upload(base, config_bytes)
    doc = {
        "schemaVersion": 2,
        "mediaType": manifest["mediaType"],
        "config": {
            "mediaType": manifest["config"]["mediaType"],
            "digest": sha256_digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [bb.descriptor("oci"), *manifest["layers"]],
    }
    _http("PUT", f"{base}/manifests/latest", json.dumps(doc).encode(), manifest["mediaType"])
    return big, bigrun, chain_id(diff_ids)


# --- measurements ------------------------------------------------------------------------


def pull_once(b: Bench, who: str, ref: str, chain: str) -> dict[str, Sample]:
    """One pull by ``who``; its sample by row (skopeo's also timed with the ``sync``)."""
    if who == SKOPEO_COPY:
        assert SKOPEO is not None
        dest = Path(tempfile.mkdtemp(prefix="skopeo-", dir=b.scratch))
        try:
            argv = [SKOPEO, "copy", "--quiet", "--src-tls-verify=false"]
            s = timed([[*argv, f"docker://{ref}", f"oci:{dest}:latest"]], None)
            # skopeo never fsyncs, the daemons do at each blob's commit: the sync shows
            # what writing the bytes out costs.
            t0 = time.perf_counter()
            os.sync()
            synced = Sample(s.wall + time.perf_counter() - t0, s.client_cpu)
            return {SKOPEO_COPY: s, SKOPEO_SYNC: synced}
        finally:
            shutil.rmtree(dest, ignore_errors=True)
    d = b.theirs if who in (CTR_THEIRS, FETCH_THEIRS) else b.ours
    assert d is not None
    fetch = who in (FETCH_OURS, FETCH_THEIRS)
    if who == PCD_PULL:
        argv = b.pcd("pull", "--insecure-registry", b.host, ref)
    else:
        sub = ("content", "fetch") if fetch else ("images", "pull")
        argv = b.ctr(d, *sub, "--plain-http", ref)
    s = timed([argv], d, b.env)
    if not fetch:
        b.check_unpacked(d, chain)
    b.remove_image(d, ref)
    return {who: s}


def measure_pull(b: Bench, ref: str, chain: str, runs: int) -> dict[str, list[Sample]]:
    who = [PCD_PULL, CTR_OURS, FETCH_OURS, SKOPEO_COPY]
    if b.theirs is not None:
        who += [CTR_THEIRS, FETCH_THEIRS]
    rows = [*(w for w in who if w != SKOPEO_COPY), SKOPEO_COPY, SKOPEO_SYNC]
    out: dict[str, list[Sample]] = {w: [] for w in rows}
    for w in who:  # warm-up: code paths, the registry's files in the page cache
        log(f"warm-up: {w}")
        pull_once(b, w, ref, chain)
    for i, order in enumerate(rotations(who, runs)):
        log(f"pull run {i + 1}/{runs}")
        for w in order:
            for key, s in pull_once(b, w, ref, chain).items():
                out[key].append(s)
    return out


def measure_to_running(b: Bench, ref: str, chain: str, runs: int) -> dict[str, list[Sample]]:
    ours = "pcd run --rm --pull always -> pycontainerd"
    theirs = "ctr images pull + ctr run --rm -> containerd"
    who = [ours] + ([theirs] if b.theirs else [])
    out: dict[str, list[Sample]] = {w: [] for w in who}
    for i, order in enumerate(rotations(who, runs)):
        log(f"pull-to-running run {i + 1}/{runs}")
        for w in order:
            if w == ours:
                argv = b.pcd("run", "--rm", "--pull", "always", "--network", "none",
                             "--insecure-registry", b.host, ref, "true")  # fmt: skip
                out[w].append(timed([argv], b.ours, b.env))
                b.check_unpacked(b.ours, chain)
                b.remove_image(b.ours, ref)
            else:
                assert b.theirs is not None
                pull = b.ctr(b.theirs, "images", "pull", "--plain-http", ref)
                run = b.ctr(b.theirs, "run", "--rm", ref, f"ptr-{i}", "true")
                out[w].append(timed([pull, run], b.theirs))
                b.check_unpacked(b.theirs, chain)
                b.remove_image(b.theirs, ref)
    return out


def measure_run(b: Bench, runs: int) -> dict[str, list[Sample]]:
    archive = b.scratch / "busybox.tar"
    write_oci_archive(archive, {BUSYBOX_REF: busybox_image()})
    run_cmd(b.pcd("load", "-i", str(archive)), b.env)
    if b.theirs is not None:
        run_cmd(b.ctr(b.theirs, "images", "import", str(archive)))
    pcd_run = "pcd run --rm --network none -> pycontainerd"
    ctr_run = f"ctr run --rm --runtime {PYRUNC.split('.', 2)[2]} -> pycontainerd"
    ctd_run = "ctr run --rm (runc.v2) -> containerd 1.6"
    # The CLI's own start-up (interpreter and imports, no RPC), to show where pcd's time goes.
    startup = "  pcd --help (CLI start-up alone)"
    who = [pcd_run, ctr_run] + ([ctd_run] if b.theirs else []) + [startup]

    def argv(w: str, n: str) -> tuple[list[str], Daemon | None]:
        if w == startup:
            return b.pcd("--help"), None
        if w == pcd_run:
            return b.pcd("run", "--rm", "--network", "none", BUSYBOX_REF, "true"), b.ours
        if w == ctr_run:
            return b.ctr(b.ours, "run", "--rm", "--runtime", PYRUNC, BUSYBOX_REF, n, "true"), b.ours
        assert b.theirs is not None
        return b.ctr(b.theirs, "run", "--rm", BUSYBOX_REF, n, "true"), b.theirs

    out: dict[str, list[Sample]] = {w: [] for w in who}
    log(f"run --rm true: {runs} runs each, interleaved")
    for i, order in enumerate(rotations(who, runs + 2)):
        for w in order:
            cmd, d = argv(w, f"lat-{i}")
            s = timed([cmd], d, b.env, sync=False)
            if i >= 2:  # the first two rounds warm up
                out[w].append(s)
    return out


# --- report ------------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        cells = [
            c.ljust(w) if j == 0 else c.rjust(w)
            for j, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        print(" | ".join(cells))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print()


def _med(samples: list[Sample], key: str = "wall") -> float:
    return statistics.median(float(getattr(s, key)) for s in samples)


def _spread(samples: list[Sample], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    walls = [s.wall * scale for s in samples]
    return f"{fmt.format(min(walls))}..{fmt.format(max(walls))}"


def report(
    inputs: Inputs,
    pull: dict[str, list[Sample]],
    to_running: dict[str, list[Sample]],
    run: dict[str, list[Sample]],
) -> dict[str, Any]:
    mb = inputs.compressed / MB
    print(
        f"\n1. pull of {mb:.0f} MB ({inputs.uncompressed / MB:.0f} MB of tar) from "
        f"docker-registry on 127.0.0.1, median of {len(pull[PCD_PULL])} runs"
    )
    rows: list[tuple[str, ...]] = [
        ("contender", "median s", "min..max s", "MB/s", "daemon CPU s", "client CPU s")
    ]
    for w, ss in pull.items():
        rows.append((
            w, f"{_med(ss):.2f}", _spread(ss), f"{mb / _med(ss):.1f}",
            f"{_med(ss, 'daemon_cpu'):.2f}" if w not in (SKOPEO_COPY, SKOPEO_SYNC) else "-",
            f"{_med(ss, 'client_cpu'):.2f}",
        ))  # fmt: skip
    _table(rows)
    ratio = _med(pull[SKOPEO_COPY]) / _med(pull[PCD_PULL])
    print(f"pcd pull MB/s / skopeo copy MB/s: {ratio:.2f}x (issue 5 asks for >= 1.00x)")
    fetch = _med(pull[SKOPEO_COPY]) / _med(pull[FETCH_OURS])
    print(f"download alone (ctr fetch -> pycontainerd / skopeo copy): {fetch:.2f}x\n")

    print(f"2. pull-to-running of {mb:.0f} MB + busybox, running `true` (start to exit)")
    rows = [("contender", "median s", "min..max s", "runs")]
    for w, ss in to_running.items():
        rows.append((w, f"{_med(ss):.2f}", _spread(ss), str(len(ss))))
    _table(rows)

    print("3. `run --rm IMG true` wall time, busybox image present")
    rows = [("contender", "median ms", "p90 ms", "min..max ms", "runs")]
    for w, ss in run.items():
        rows.append((
            w, f"{_med(ss) * 1e3:.0f}", f"{percentile([s.wall for s in ss], 90) * 1e3:.0f}",
            _spread(ss, 1e3, "{:.0f}"), str(len(ss)),
        ))  # fmt: skip
    _table(rows)
    names = list(run)
    run_ratio = _med(run[names[0]]) / _med(run[names[1]])
    print(f"pcd run / ctr run against the same daemon: {run_ratio:.2f}x")
    return {"pull_vs_skopeo": ratio, "run_vs_ctr": run_ratio}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs (about two minutes)")
    ap.add_argument("--no-containerd", action="store_true", help="leave containerd out")
    args = ap.parse_args(argv)
    missing = [n for n, p in (("docker-registry", REGISTRY), ("skopeo", SKOPEO), ("ctr", CTR))
               if p is None]  # fmt: skip
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 1
    plan = QUICK if args.quick else Plan()
    with_containerd = CONTAINERD is not None and not args.no_containerd
    started = time.monotonic()
    inputs = build_inputs()
    with bench(with_containerd) as b:
        log(f"pushing the images to {b.host}")
        big, bigrun, run_chain = push_images(b, inputs)
        pull = measure_pull(b, big, inputs.chain_id, plan.pull_runs)
        to_running = measure_to_running(b, bigrun, run_chain, plan.to_running_runs)
        run = measure_run(b, plan.run_runs)
    print(
        f"\n(ran {time.monotonic() - started:.0f}s on {os.cpu_count()} CPUs; pcd is {PCD_CMD[-1]})"
    )
    report(inputs, pull, to_running, run)
    if not with_containerd:
        print("containerd: " + ("not installed" if CONTAINERD is None else "skipped"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
