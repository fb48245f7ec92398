#!/usr/bin/env python3
"""Write clusters/aws.yaml for another AWS region (and, if given, your account, bucket and database).

`ray up` configs have no variables, and aws.yaml names its region in 6 places: the provider's region and
availability zones, the ECR registry of the image (twice), the region the nodes' AWS clients use, and the
ECR login. This renders them all from one REGION, keeping every comment:

    python clusters/render_aws.py eu-west-1 --zones a,b,c --account 123456789012 \\
        --bucket my-bucket --rds-endpoint alignprop-mlflow.abc.eu-west-1.rds.amazonaws.com \\
        --out clusters/aws-eu-west-1.yaml
    ray up clusters/aws-eu-west-1.yaml

Zones are letters of REGION (default a,b,c; list a region's with `aws ec2 describe-availability-zones
--region REGION --query 'AvailabilityZones[].ZoneName' --output text`). Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "aws.yaml"
REGION = "us-west-2"  # the region aws.yaml is written for
ZONES_LINE = re.compile(r"^(  availability_zone: ).*$", re.MULTILINE)
PLACEHOLDERS = {"account": "YOUR_ACCOUNT_ID", "bucket": "YOUR_BUCKET", "rds_endpoint": "YOUR_RDS_ENDPOINT"}


def render(text: str, region: str, zones: list[str], **values: str | None) -> str:
    """aws.yaml's `text` for `region` and its availability `zones` (letters), placeholders filled where
    `values` (account, bucket, rds_endpoint) give them."""
    if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", region):
        raise ValueError(f"not an AWS region name: {region!r} (e.g. eu-west-1)")
    if not zones or not all(re.fullmatch(r"[a-z]", z) for z in zones):
        raise ValueError(f"zones must be letters such as a,b,c (got {','.join(zones)!r})")
    if len(ZONES_LINE.findall(text)) != 1 or ZONES_LINE.sub("", text).count(REGION) != 5:
        raise ValueError(f"{TEMPLATE} no longer names {REGION} where this script expects it: update both")
    text = ZONES_LINE.sub("\\g<1>" + ",".join(region + z for z in zones), text.replace(REGION, region))
    for key, placeholder in PLACEHOLDERS.items():
        if values.get(key):
            text = text.replace(placeholder, values[key])
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("region", help="AWS region, e.g. eu-west-1")
    parser.add_argument("--zones", default="a,b,c", help="availability zone letters (default a,b,c)")
    parser.add_argument("--account", help="your AWS account id (YOUR_ACCOUNT_ID)")
    parser.add_argument("--bucket", help="the S3 bucket (YOUR_BUCKET)")
    parser.add_argument("--rds-endpoint", help="the MLflow database's endpoint (YOUR_RDS_ENDPOINT)")
    parser.add_argument("--out", help="write here (default: standard output)")
    args = parser.parse_args(argv)
    values = {"account": args.account, "bucket": args.bucket, "rds_endpoint": args.rds_endpoint}
    try:
        text = render(TEMPLATE.read_text(), args.region, args.zones.split(","), **values)
    except ValueError as err:
        print(f"render_aws.py: {err}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
