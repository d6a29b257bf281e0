#!/opt/s3/bin/python
"""Stand-in of MinIO's `mc` for the commands trainflow's compose file runs, against moto's S3 server."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import boto3

ALIASES = Path.home() / ".mc-standin-aliases.json"


def client(alias: str):
    conf = json.loads(ALIASES.read_text())[alias]
    return boto3.client(
        "s3", endpoint_url=conf["url"], aws_access_key_id=conf["key"],
        aws_secret_access_key=conf["secret"], region_name="us-east-1",
    )


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    flags = {a for a in argv if a.startswith("--")}
    if args[:1] == ["ready"]:
        try:
            urllib.request.urlopen("http://127.0.0.1:9000/moto-api/", timeout=3)
        except Exception as error:  # noqa: BLE001 - a health check prints why and fails
            print(f"not ready: {error}")
            return 1
        print("The cluster is ready")
        return 0
    if args[:2] == ["alias", "set"]:
        name, url, key, secret = args[2:6]
        aliases = json.loads(ALIASES.read_text()) if ALIASES.exists() else {}
        aliases[name] = {"url": url, "key": key, "secret": secret}
        ALIASES.write_text(json.dumps(aliases))
        print(f"Added `{name}` successfully.")
        return 0
    if args[:1] == ["mb"]:
        alias, _, bucket = args[1].partition("/")
        s3 = client(alias)
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if bucket in existing:
            if "--ignore-existing" in flags:
                print(f"Bucket `{args[1]}` already exists.")
                return 0
            print(f"mc: bucket {bucket} exists", file=sys.stderr)
            return 1
        s3.create_bucket(Bucket=bucket)
        print(f"Bucket created successfully `{args[1]}`.")
        return 0
    if args[:1] == ["admin"]:
        print(f"stand-in mc: `mc {' '.join(argv)}` is a no-op (moto's S3 accepts any access key)")
        return 0
    print(f"stand-in mc: unsupported command {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
