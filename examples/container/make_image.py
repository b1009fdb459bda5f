"""Write an OCI image archive (the tar form of an OCI image layout, as `skopeo copy
oci-archive:` or `docker save` of Docker 25+ produce) with one layer holding ROOTFS.

Stands in for `docker save` so that the example needs no container engine. Deterministic:
members sorted, owner 0:0, mtime SOURCE_DATE_EPOCH (else 0).

    python make_image.py ROOTFS OUT.tar
"""

import hashlib
import io
import json
import os
import sys
import tarfile

EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


def _info(name, size=0, kind=tarfile.REGTYPE, mode=0o644):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode, info.mtime = size, kind, mode, EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def layer(rootfs) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for top, dirs, names in os.walk(rootfs):
            dirs.sort()
            for name in sorted(dirs):
                path = os.path.relpath(os.path.join(top, name), rootfs)
                tar.addfile(_info(path, kind=tarfile.DIRTYPE, mode=0o755))
            for name in sorted(names):
                full = os.path.join(top, name)
                with open(full, "rb") as handle:
                    data = handle.read()
                mode = 0o755 if os.stat(full).st_mode & 0o111 else 0o644
                tar.addfile(_info(os.path.relpath(full, rootfs), len(data), mode=mode), io.BytesIO(data))
    return out.getvalue()


def main(rootfs, target):
    blobs = {}

    def blob(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        blobs[f"blobs/sha256/{digest}"] = data
        return {"digest": f"sha256:{digest}", "size": len(data)}

    layer_desc = dict(blob(layer(rootfs)), mediaType="application/vnd.oci.image.layer.v1.tar")
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/sbin/vm-agent"]},
              "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}}
    config_desc = dict(blob(json.dumps(config, sort_keys=True).encode()),
                       mediaType="application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc = dict(blob(json.dumps(manifest, sort_keys=True).encode()),
                         mediaType="application/vnd.oci.image.manifest.v1+json",
                         platform={"architecture": "amd64", "os": "linux"})
    files = dict(blobs)
    files["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}, sort_keys=True).encode()
    tmp = target + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            tar.addfile(_info(name, len(files[name])), io.BytesIO(files[name]))
    os.replace(tmp, target)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
