#!/usr/bin/env python3
"""Fetches the tansu and tansu-storage crates from crates.io (checksums checked against the crates.io
index and tansu's own Cargo.lock), unpacks them into DEST, and applies hookline's one patch to
tansu-storage, then points tansu's manifest at the patched copy.

The patch: in tansu-storage 0.6.0 the storage request loop (ChannelRequestService::serve) ends for good
when one answer cannot be handed back (the client disconnected while its request was being served) or one
request fails; the broker then answers every later request with UnableToSend. Seen here as a broker that
never accepts a Produce again after a restart under load. Patched: the loop logs and goes on.

Usage: fetch-and-patch.py VERSION DEST
"""
import hashlib
import io
import json
import sys
import tarfile
import urllib.request

version, dest = sys.argv[1], sys.argv[2]


def get(url):
    with urllib.request.urlopen(url, timeout=120) as r:
        return r.read()


def unpack(name, expect_sha256):
    data = get(f"https://static.crates.io/crates/{name}/{name}-{version}.crate")
    got = hashlib.sha256(data).hexdigest()
    if got != expect_sha256:
        sys.exit(f"{name}-{version}: checksum {got}, expected {expect_sha256}")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as t:
        try:
            t.extractall(dest, filter="data")
        except TypeError:  # Python without extraction filters (before 3.11.4 / 3.12)
            t.extractall(dest)
    return f"{dest}/{name}-{version}"


index = get("https://index.crates.io/ta/ns/tansu").decode()
tansu_sum = next(json.loads(l)["cksum"] for l in index.splitlines() if json.loads(l)["vers"] == version)
tansu = unpack("tansu", tansu_sum)

lock = open(f"{tansu}/Cargo.lock").read()
entry = lock[lock.index('name = "tansu-storage"') :].split("\n\n")[0]
assert f'version = "{version}"' in entry, entry
storage_sum = entry.split('checksum = "')[1].split('"')[0]
storage = unpack("tansu-storage", storage_sum)

path = f"{storage}/src/service.rs"
src = open(path).read()
old = """                Some((request, tx)) = req.recv() => {
                    self.inner
                    .serve(ctx.clone(), request)
                    .await
                    .and_then(|response| {
                        tx.send(response).map_err(|_unsent| Error::UnableToSend)
                    })?
                }"""
new = """                Some((request, tx)) = req.recv() => {
                    // Patched by hookline's scripts/tansu: one failed request or one requester that went
                    // away must not end this loop (it served every later request of the broker).
                    match self.inner.serve(ctx.clone(), request).await {
                        Ok(response) => {
                            if tx.send(response).is_err() {
                                debug!("requester went away before its answer");
                            }
                        }
                        Err(e) => error!(?e, "storage request failed"),
                    }
                }"""
if src.count(old) != 1:
    sys.exit(f"{path}: the code to patch was not found exactly once")
open(path, "w").write(src.replace(old, new))

with open(f"{tansu}/Cargo.toml", "a") as f:
    f.write(f'\n[patch.crates-io]\ntansu-storage = {{ path = "../tansu-storage-{version}" }}\n')
print(tansu)
