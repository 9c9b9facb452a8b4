"""The `gptflow submit`, `gptflow jobs` and `gptflow schedule` subcommands: argparse in, one of
flows/ops/jobs.py or flows/ops/schedule.py out, nothing else. flows/cli.py registers them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

COMMANDS = ("submit", "jobs", "schedule")
# Subcommands that take no pipeline config (like `generate`).
CONFIGLESS = ("jobs",)


def add_parsers(
    sub: Any,
    config_args: Callable[[argparse.ArgumentParser], None],
    step_args: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser(
        "submit", help="submit the pipeline to a Ray cluster as a Ray job; prints the job id"
    )
    config_args(p)
    step_args(p)
    p.add_argument(
        "--address",
        help="the cluster's Jobs API, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)",
    )
    p.add_argument(
        "--submission-id", help="a job id of your choosing; submitting an id that exists is a no-op"
    )

    p = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    p.add_argument("action", choices=("status", "logs", "stop"))
    p.add_argument("job", help="the id `gptflow submit` printed")
    p.add_argument(
        "--address",
        help="the cluster's Jobs API, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)",
    )
    p.add_argument("--follow", action="store_true", help="logs: follow them until the job ends")
    p.add_argument(
        "--allow-no-auth", action="store_true", help="accept a cluster without token authentication"
    )

    p = sub.add_parser(
        "schedule",
        help="run (or submit) the pipeline on a cron schedule or when the corpus changes",
    )
    config_args(p)
    step_args(p)
    p.add_argument(
        "--cron", help='crontab expression, e.g. "0 3 * * *" (UTC); 6 fields: seconds first'
    )
    p.add_argument(
        "--on-new-data",
        action="store_true",
        help="run only when the corpus fingerprint changed since the last successful run",
    )
    p.add_argument(
        "--address",
        help="submit each run to this Ray cluster (http://HEAD:8265) instead of running here",
    )
    p.add_argument("--once", action="store_true", help="one trigger now, then exit")


def _run_args(args: argparse.Namespace) -> list[str]:
    """The step selection, passed on to the `gptflow run` a job or a scheduled run executes."""
    out: list[str] = []
    for name in args.only:
        out += ["--only", name]
    if args.start:
        out += ["--from", args.start]
    for name in args.force:
        out += ["--force", name]
    return out


def run(args: argparse.Namespace, cfg: Any) -> str:
    """Execute one ops subcommand; returns the text to print last."""
    from flows.ops import jobs

    if args.command == "submit":
        job_id, new = jobs.submit(
            cfg,
            args.address,
            _run_args(args),
            submission_id=args.submission_id,
            verbose=args.verbose,
        )
        return job_id if new else f"{job_id} (exists already: not submitted again)"
    if args.command == "jobs":
        client = jobs.client(args.address, allow_no_auth=args.allow_no_auth)
        if args.action == "status":
            s = jobs.status(client, args.job)
            return f"{s['submission_id']}: {s['status']}" + (
                f" ({s['message']})" if s["message"] else ""
            )
        if args.action == "stop":
            return f"{args.job}: {jobs.stop(client, args.job)}"
        if args.follow:
            import sys

            for chunk in jobs.follow(client, args.job):
                sys.stdout.write(chunk)
                sys.stdout.flush()
            return f"{args.job}: {jobs.status(client, args.job)['status']}"
        return jobs.logs(client, args.job).rstrip("\n")
    from flows.ops.schedule import run_schedule

    if not args.once and not args.cron:
        raise ValueError("gptflow schedule: give --cron EXPR (or --once for one trigger now)")
    return run_schedule(cfg, args.cron, args.on_new_data, args.address, args.once, _run_args(args))
