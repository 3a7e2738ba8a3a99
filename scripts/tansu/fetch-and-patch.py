#!/usr/bin/env python3
"""Fetches the tansu and tansu-storage crates from crates.io (checksums checked against the crates.io
index and tansu's own Cargo.lock), unpacks them into DEST, and applies hookline's one patch to
tansu-storage, then points tansu's manifest at the patched copy.

The patch: tansu-storage 0.6.0 serves every storage request of the broker from one loop
(ChannelRequestService::serve), and that loop ends for good when one answer cannot be handed back (the
client disconnected while its request was being served), when one request fails, or when one request
panics -- which a storage error during a consumer-group update does (`unreachable!()` in
`From<ServiceError> for UpdateError<GroupDetail>`). The broker then answers every later request with
UnableToSend. Seen here as a broker that never accepts a Produce again after a restart under load.
Patched: the loop logs and goes on, and that conversion returns the storage error.

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
                    // A panic while serving one request is caught for the same reason.
                    let served = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
                        self.inner.serve(ctx.clone(), request),
                    ))
                    .await;
                    match served {
                        Ok(Ok(response)) => {
                            if tx.send(response).is_err() {
                                debug!("requester went away before its answer");
                            }
                        }
                        Ok(Err(e)) => error!(?e, "storage request failed"),
                        Err(_) => error!("storage request panicked"),
                    }
                }"""
if src.count(old) != 1:
    sys.exit(f"{path}: the code to patch was not found exactly once")
src = src.replace(old, new)
# 2. A storage error during a group update was converted with unreachable!() (a panic that ended the
#    same loop); it becomes the update's error instead.
old = """        if let ServiceError::UpdateGroupDetail(error) = value {
            error
        } else {
            unreachable!()
        }"""
new = """        match value {
            ServiceError::UpdateGroupDetail(error) => error,
            ServiceError::Storage(error) => UpdateError::Error(error),
        }"""
if src.count(old) != 1:
    sys.exit(f"{path}: the group-update conversion was not found exactly once")
src = src.replace(old, new)
open(path, "w").write(src)

with open(f"{tansu}/Cargo.toml", "a") as f:
    f.write(f'\n[patch.crates-io]\ntansu-storage = {{ path = "../tansu-storage-{version}" }}\n')
print(tansu)
