"""Containers as containerd's own ``ctr`` drives them against the real daemon: create from
an imported image, ls, info (the stored spec comes back intact), label, rm."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import grpc
import pytest

from pycontainerd.api.services.containers.v1 import containers_pb2 as pb
from pycontainerd.api.services.containers.v1 import containers_pb2_grpc
from tests.support.daemon import Daemon, metadata
from tests.support.images import busybox_image, write_oci_archive

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.ctr, pytest.mark.root]  # unpacking mounts overlayfs

NS = "ctrcontainers"
IMAGE = "example.com/ctr/busybox:1"
SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"


def get(daemon: Daemon, cid: str) -> pb.Container:
    with daemon.channel() as ch:
        stub = containers_pb2_grpc.ContainersStub(ch)
        resp = stub.Get(pb.GetContainerRequest(id=cid), metadata=metadata(NS))
        return resp.container


def ls_rows(daemon: Daemon) -> dict[str, list[str]]:
    out = daemon.ctr("container", "ls", namespace=NS).stdout
    return {cols[0]: cols[1:] for cols in (line.split() for line in out.splitlines()[1:])}


def test_container_create_ls_info_label_rm(daemon: Daemon, tmp_path: Path) -> None:
    archive = tmp_path / "bb.tar"
    write_oci_archive(archive, {IMAGE: busybox_image()})
    daemon.ctr("images", "import", str(archive), namespace=NS)

    daemon.ctr("container", "create", IMAGE, "c1", "echo", "hi", namespace=NS)
    assert ls_rows(daemon) == {"c1": [IMAGE, "io.containerd.runc.v2"]}

    info = json.loads(daemon.ctr("container", "info", "c1", namespace=NS).stdout)
    assert info["ID"] == "c1" and info["Image"] == IMAGE
    assert info["Runtime"]["Name"] == "io.containerd.runc.v2"
    assert info["Runtime"]["Options"]["type_url"] == "containerd.runc.v1.Options"
    assert (info["Snapshotter"], info["SnapshotKey"]) == ("overlayfs", "c1")
    assert info["Labels"] == {"io.containerd.image.config.stop-signal": "SIGTERM"}
    spec = info["Spec"]
    assert spec["process"]["args"] == ["echo", "hi"]
    assert spec["root"]["path"] == "rootfs"
    # The spec ctr built client-side was stored as opaque bytes and handed back as sent.
    stored = get(daemon, "c1")
    assert stored.spec.type_url == SPEC_URL
    assert json.loads(stored.spec.value) == spec

    res = daemon.ctr("container", "create", IMAGE, "c1", "sh", namespace=NS, check=False)
    assert res.returncode != 0 and "already exists" in res.stderr

    out = daemon.ctr("container", "label", "c1", "a=b", namespace=NS).stdout
    assert "a=b" in out
    assert get(daemon, "c1").labels["a"] == "b"
    daemon.ctr("container", "label", "c1", "a=", namespace=NS)  # an empty value removes it
    assert "a" not in get(daemon, "c1").labels
    assert json.loads(get(daemon, "c1").spec.value) == spec

    # ctr checks for a task first (Tasks/Get), then removes the snapshot and the record.
    daemon.ctr("container", "rm", "c1", namespace=NS)
    assert ls_rows(daemon) == {}
    with pytest.raises(grpc.RpcError) as exc:
        get(daemon, "c1")
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    snapshots = daemon.ctr("snapshots", "ls", namespace=NS).stdout
    assert "c1" not in [line.split()[0] for line in snapshots.splitlines()[1:]]

    res = daemon.ctr("container", "info", "c1", namespace=NS, check=False)
    assert res.returncode != 0 and "not found" in res.stderr
