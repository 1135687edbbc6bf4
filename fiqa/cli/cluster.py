"""Runs on an existing Ray cluster, through its Jobs API: `fiqa submit`, `fiqa jobs`, `fiqa stop`."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from typing import Any

from fiqa.cli.options import add_set
from fiqa.cluster.submit import (
    TERMINAL,
    ClusterError,
    connect,
    follow,
    resolve_address,
    selection,
    status_name,
    submit_run,
    wait_for,
)
from fiqa.config import load_config
from fiqa.pipelines import STAGE_NAMES


def _finish(client, submission_id: str, status: str, brief: bool) -> int:
    if status == "SUCCEEDED":
        print(f"job {submission_id} succeeded", file=sys.stderr)
        return 0
    message = client.get_job_info(submission_id).message or ""
    if brief:  # the logs were just streamed; the message would repeat their tail
        message = message.split("\n", 1)[0]
    print(f"fiqa: job {submission_id} {status.lower()}: {message}", file=sys.stderr)
    return 1


def cmd_submit(args: argparse.Namespace) -> int:
    from fiqa.models.registry import check_archs

    cfg = load_config(args.config, args.set)  # fails here, before any network call
    check_archs(cfg)
    address = resolve_address(args.address, cfg.ray.address)
    client = connect(address)
    submission_id, attached = submit_run(
        client, cfg, args.stage, ship_code=args.ship_code, until=args.until
    )
    print(submission_id, flush=True)
    if attached:
        print(
            f"{submission_id} is already active for this run and config; "
            + ("attaching to it" if args.wait or args.follow else "not submitting again"),
            file=sys.stderr,
        )
    else:
        what = selection(args.stage, args.until)
        print(
            f"submitted {submission_id} to {address} "
            f"({'all stages' if what == 'all' else what}); "
            f"logs: fiqa submit ... --follow, or ray job logs -f {submission_id}",
            file=sys.stderr,
        )
    if not (args.wait or args.follow):
        return 0
    try:
        status = follow(client, submission_id) if args.follow else wait_for(client, submission_id)
    except KeyboardInterrupt:
        print(
            f"\nstopped watching; the job goes on (fiqa stop {submission_id} ends it)",
            file=sys.stderr,
        )
        return 130
    return _finish(client, submission_id, status, brief=args.follow)


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    client = connect(resolve_address(args.address))
    jobs = sorted(
        (j for j in client.list_jobs() if j.submission_id), key=lambda j: j.start_time or 0
    )
    rows = [
        (j.submission_id, status_name(j.status), _when(j.start_time))
        + (_when(j.end_time), j.entrypoint)
        for j in jobs
    ]
    header = ("SUBMISSION ID", "STATUS", "START", "END", "ENTRYPOINT")
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    client = connect(resolve_address(args.address))
    try:
        stopping = client.stop_job(args.job_id)
    except RuntimeError as e:
        raise ClusterError(f"cannot stop {args.job_id}: {e}") from None
    if not stopping:
        print(f"{args.job_id} is not running ({status_name(client.get_job_status(args.job_id))})")
        return 0
    deadline = time.time() + args.timeout
    while time.time() < deadline:  # Ray sends SIGTERM, then SIGKILL a few seconds later
        status = status_name(client.get_job_status(args.job_id))
        if status in TERMINAL:
            print(f"{args.job_id}: {status}")
            return 0
        time.sleep(0.5)
    print(f"{args.job_id}: stop requested; still ending after {args.timeout:.0f} s")
    return 0


ADDRESS_HELP = (
    "the Ray dashboard, e.g. http://127.0.0.1:8265 "
    "(default: $RAY_ADDRESS, then ray.address when it is an http URL)"
)


def add_submit(sub: Any) -> None:
    s = sub.add_parser("submit", help="run the pipeline (or one stage) as a job on a Ray cluster")
    s.add_argument("config", metavar="CONFIG", help="the run's YAML config (checked here first)")
    s.add_argument("--address", help=ADDRESS_HELP)
    add_set(s, "train_teacher.epochs=3")
    which = s.add_mutually_exclusive_group()
    which.add_argument(
        "--stage",
        choices=STAGE_NAMES,
        metavar="STAGE",
        help="run only this stage: " + ", ".join(STAGE_NAMES),
    )
    which.add_argument(
        "--until", choices=STAGE_NAMES, metavar="STAGE", help="stop after this stage"
    )
    s.add_argument("--wait", action="store_true", help="wait for the job; exit 1 if it fails")
    s.add_argument(
        "--follow", action="store_true", help="stream the job's logs until it ends (implies --wait)"
    )
    s.add_argument(
        "--no-ship-code",
        dest="ship_code",
        action="store_false",
        help="run the fiqa installed on the cluster instead of shipping this one",
    )
    s.set_defaults(func=cmd_submit)


def add_jobs(sub: Any) -> None:
    s = sub.add_parser("jobs", help="list the jobs of a Ray cluster")
    s.add_argument("--address", help=ADDRESS_HELP)
    s.set_defaults(func=cmd_jobs)


def add_stop(sub: Any) -> None:
    s = sub.add_parser("stop", help="stop a job on a Ray cluster")
    s.add_argument("job_id", metavar="JOB_ID", help="the submission id `fiqa submit` printed")
    s.add_argument("--address", help=ADDRESS_HELP)
    s.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for it to end (default 60)"
    )
    s.set_defaults(func=cmd_stop)
