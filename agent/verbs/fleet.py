"""`fieldgate fleet push|status`: the platform-side rollout of a configuration, and the fleet's state (agent/control/fleet.py).

Runs on the platform (or an operator's machine), not on a gateway: it talks to the platform's broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config.units import parse_duration

if TYPE_CHECKING:
    from agent.control.fleet import FleetLink, Target


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("fleet", help="platform side: roll a config out to gateways in stages; fleet status")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    link = argparse.ArgumentParser(add_help=False)
    link.add_argument(
        "--broker", required=True, metavar="URL", help="the platform's broker, mqtt://HOST:PORT"
    )
    link.add_argument("--username", default=None)
    link.add_argument(
        "--password-file",
        type=Path,
        default=None,
        help="file holding the broker password (never on the line)",
    )
    link.add_argument(
        "--prefix", default="fieldgate", help="topic_prefix of the gateways (default fieldgate)"
    )

    push = actions.add_parser(
        "push",
        parents=[link],
        help="sign and push each gateway's new config, stage by stage; halt and roll back on a failure",
    )
    push.add_argument(
        "configs", type=Path, metavar="NEW_DIR", help="the new configs, one GATEWAY_ID.yaml each"
    )
    push.add_argument(
        "--previous",
        type=Path,
        required=True,
        metavar="DIR",
        help="the configs the gateways run now (GATEWAY_ID.yaml), pushed back on a rollback",
    )
    push.add_argument(
        "--gateways", default=None, help="comma-separated ids, in rollout order (default: every file, sorted)"
    )
    push.add_argument(
        "--stages", default="1,10%,100%", help="cumulative counts per stage (default 1,10%%,100%%)"
    )
    push.add_argument(
        "--key", type=Path, default=None, help="Ed25519 private key (PEM) that signs the configs"
    )
    push.add_argument(
        "--timeout", default="3m", help="how long a gateway may take to confirm (default 3m; past it: failed)"
    )
    push.add_argument("--id", default=None, help="request id (default fleet-<unix time>)")
    push.set_defaults(func=main_push)

    st = actions.add_parser(
        "status", parents=[link], help="per gateway: status, config, confirmed, last seen, pending"
    )
    st.add_argument("--gateways", default=None, help="comma-separated ids (default: every gateway heard)")
    st.add_argument(
        "--listen",
        default="2s",
        help="how long to listen (default 2s: retained status and config/state; health, which carries "
        "`pending`, comes every health_interval)",
    )
    st.set_defaults(func=main_status)


def _password(args: argparse.Namespace) -> str | None:
    if args.password_file is None:
        return None
    from agent.upstream.tls import read_secret

    return read_secret(args.password_file)


def main_push(args: argparse.Namespace) -> int:
    from agent.control.fleet import FleetSetupError, Target, load_signing_key, parse_stages

    try:
        names = (
            [g.strip() for g in args.gateways.split(",") if g.strip()]
            if args.gateways
            else sorted(p.stem for p in args.configs.glob("*.yaml"))
        )
        targets: list[Target] = []
        for gw in names:
            new, old = args.configs / f"{gw}.yaml", args.previous / f"{gw}.yaml"
            for f in (new, old):
                if not f.is_file():
                    raise FleetSetupError(
                        f"{f}: no such file (every gateway needs its new and its previous config)"
                    )
            targets.append(Target(gw, new.read_bytes(), old.read_bytes()))
        stages = parse_stages(args.stages, len(targets))
        key = load_signing_key(args.key) if args.key is not None else None
        timeout = parse_duration(args.timeout)
        password = _password(args)
    except (FleetSetupError, ValueError, OSError) as exc:
        print(f"fleet push: {exc}", file=sys.stderr)
        return 2
    request_id = args.id or f"fleet-{int(time.time())}"
    return asyncio.run(_push(args, targets, stages, request_id, key, timeout, password))


async def _push(
    args: argparse.Namespace,
    targets: list[Target],
    stages: list[int],
    request_id: str,
    key: Any,
    wait: float,
    password: str | None,
) -> int:
    import aiomqtt

    from agent.control.fleet import FleetLink, client_for, rollout, rollout_table

    tlist = targets
    print(
        f"fleet push {request_id}: {len(tlist)} gateways in {len(stages)} stages ({', '.join(map(str, stages))})"
    )
    link: FleetLink | None = None
    try:
        async with client_for(args.broker, args.username, password, f"fleet-push-{os.getpid()}") as client:
            link = FleetLink(client, args.prefix)
            await link.subscribe()
            listener = asyncio.create_task(link.listen())
            roll = asyncio.create_task(rollout(link, tlist, stages, request_id, key, wait))
            try:
                await asyncio.wait({listener, roll}, return_when=asyncio.FIRST_COMPLETED)
                if not roll.done():  # the connection ended under the rollout: the listener says why
                    listener.result()
                    raise aiomqtt.MqttError("the broker closed the connection")
                result = roll.result()
            finally:
                for task in (listener, roll):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await task
    except aiomqtt.MqttError as exc:
        print(f"fleet push: broker {args.broker}: {exc}", file=sys.stderr)
        pushed = [t for t in tlist if link is not None and t.gateway in link.pushed]
        if pushed:
            return await _rollback_after_loss(args, pushed, request_id, key, wait, password)
        return 1
    print(rollout_table(tlist, result))
    if result.ok:
        print(f"fleet push {request_id}: every stage confirmed")
        return 0
    failed_back = [g for g, o in result.rollbacks.items() if o.result != "confirmed"]
    if failed_back:
        print(f"fleet push {request_id}: ROLLBACK NOT CONFIRMED on {', '.join(failed_back)}", file=sys.stderr)
    print(f"fleet push {request_id}: halted at stage {result.halted_at}, changed gateways rolled back")
    return 1


async def _rollback_after_loss(
    args: argparse.Namespace,
    pushed: list[Target],
    request_id: str,
    key: Any,
    wait: float,
    password: str | None,
) -> int:
    """The broker connection was lost in the middle of a rollout: every gateway sent anything may run the new
    config, so each gets its previous one back on a new connection (three attempts, 2, 4 and 6 s apart)."""
    import aiomqtt

    from agent.control.fleet import FleetLink, client_for, roll_back, table

    names = ", ".join(t.gateway for t in pushed)
    print(
        f"fleet push {request_id}: broker lost during the rollout: rolling back the {len(pushed)} gateways pushed"
    )
    for attempt in range(1, 4):
        await asyncio.sleep(2.0 * attempt)
        try:
            async with client_for(
                args.broker, args.username, password, f"fleet-push-{os.getpid()}"
            ) as client:
                link = FleetLink(client, args.prefix)
                await link.subscribe()
                listener = asyncio.create_task(link.listen())
                try:
                    backs = await roll_back(link, pushed, request_id, key, wait)
                finally:
                    listener.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await listener
            break
        except aiomqtt.MqttError as exc:
            print(f"fleet push: broker {args.broker}: {exc}", file=sys.stderr)
    else:
        print(
            f"fleet push {request_id}: ROLLBACK NOT DONE, broker unreachable; may run the new config: {names}",
            file=sys.stderr,
        )
        return 1
    print(table([("GATEWAY", "ROLLBACK", "DETAIL"), *((o.gateway, o.result, o.detail) for o in backs)]))
    failed = [o.gateway for o in backs if o.result != "confirmed"]
    if failed:
        print(f"fleet push {request_id}: ROLLBACK NOT CONFIRMED on {', '.join(failed)}", file=sys.stderr)
    print(f"fleet push {request_id}: halted by the broker's loss, pushed gateways rolled back")
    return 1


def main_status(args: argparse.Namespace) -> int:
    try:
        listen = parse_duration(args.listen)
        password = _password(args)
    except (ValueError, OSError) as exc:
        print(f"fleet status: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_status(args, listen, password))


async def _status(args: argparse.Namespace, listen: float, password: str | None) -> int:
    import aiomqtt

    from agent.control.fleet import FleetLink, client_for, status_table

    gateways = [g.strip() for g in args.gateways.split(",") if g.strip()] if args.gateways else None
    try:
        async with client_for(args.broker, args.username, password, f"fleet-status-{os.getpid()}") as client:
            link = FleetLink(client, args.prefix)
            await link.subscribe()
            try:
                async with asyncio.timeout(listen):
                    await link.listen()
            except TimeoutError:
                pass
    except aiomqtt.MqttError as exc:
        print(f"fleet status: broker {args.broker}: {exc}", file=sys.stderr)
        return 1
    if not link.views and not gateways:
        print("no gateway heard")
        return 1
    print(status_table(link.views, time.time_ns() // 1_000_000, gateways))
    return 0
