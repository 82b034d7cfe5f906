"""An experiment, not monk's code path: what a clone-first cold provision would cost.

Issue 4 asks for the intent to commit in its own transaction before the clone; issue 16 asks for
a cold provision within 1.15x of the raw clone. This script measures, alternated in one run, on
the server of MONK_DATA_DIR (the embedded one):

    raw           CREATE DATABASE ... TEMPLATE with monk's strategy for the template
    intent_first  TenantService.provision as monk does it (intent committed, clone, activation)
    clone_first   the name's advisory lock (nothing written), the clone, then ONE pipelined
                  transaction: the same reservation statement, the spare role's claim,
                  configure + activate, the pending root user, commit, unlock

It uses monk's own statements, in the other order, so the difference is the order's alone. A
crash between the clone and that commit would leave a database nobody registered: shipping it
needs the doctor to recognise such a clone (docs/benchmarks.md, session 10).

    MONK_CLONE_FILE_COPY_ABOVE=0 python docs/experiments/clone_first.py 30          # saas
    python docs/experiments/clone_first.py 20 512MB                                 # generated

Tenants it makes are purged at the end; a generated template stays (key cf_big).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from psycopg.types.json import Jsonb

from monk.adapters import registry
from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import connect
from monk.adapters.registry import pending_roots, spare_roles
from monk.adapters.registry import tenants as tenant_rows
from monk.adapters.registry.locks import advisory_key
from monk.adapters.registry.templates import TemplateBuild
from monk.bench.strategies import generate_source
from monk.core.clone_strategy import parse_size
from monk.service import purge, role_pool
from monk.service.server import Server
from monk.service.tenants import TenantService
from monk.settings import Settings


def clone_first(svc: TenantService, build: TemplateBuild, raw_name: str) -> None:
    name = svc.name(raw_name)
    target = svc.hosts.local
    pools = svc.hosts.pools()
    _password, root_hash = svc.root_passwords.take(refill=False)
    with pools.system() as reg:
        assert registry.try_lock(reg, name.database)
        spare = svc.role_secrets.take(target.name)
        assert spare is not None
        with pools.admin() as adm:
            choice = svc.clone_choice(adm, target, build)
            admin.create_database(adm, name.database, template=build.database, choice=choice)
        tenant_id, op = uuid.uuid4(), uuid.uuid4()
        values: dict[str, Any] = {
            "lock": advisory_key(name.database),
            "async": False,
            "template_db": build.database,
            "id": tenant_id,
            "name": name.display,
            "key": name.key,
            "database": name.database,
            "host": target.name,
            "template": build.key,
            "version": build.version,
            "role": name.role,
            "idempotency_key": None,
            "op": op,
            "kind": "provision",
            "params": Jsonb({"template": build.key, "version": build.version}),
            "spare": None,
            "keyholder": svc.instance_id,
            "have_lock": True,
            "spares_ok": True,
            "remote": False,
        }
        limit = svc.settings.tenant_connection_limit

        def unlock() -> None:
            registry.unlock(reg, name.database, prepare=True)

        with registry.pipelined_transaction(reg, after_commit=unlock):
            reg.execute(tenant_rows._RESERVE, values, prepare=True)
            spare_roles.queue_claim(reg, spare[0], name.role, keyholder=svc.instance_id)
            activated = tenant_rows.queue_activation(
                reg,
                tenant_id,
                op,
                migration_level=build.migration_level,
                template_version=build.version,
                configure=svc.configure_args(
                    name.database, name.role, build.database_settings, limit
                ),
            )
            pending_roots.queue_add(reg, tenant_id, root_hash.result())
        registry.fetch_tenant(activated)
    svc.root_passwords.refill()


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    settings = Settings().model_copy(update={"pool_spares": {}, "pool_roles": 0})
    target = Server.from_settings(settings).target()
    times: dict[str, list[float]] = {"raw": [], "intent_first": [], "clone_first": []}
    made: list[str] = []
    with TenantService(settings, target) as svc:
        svc.root_passwords.keep(2)
        svc.root_after_answer = True  # as monk serve and monk bench
        key = "saas"
        if len(sys.argv) > 2:
            key = "cf_big"
            try:
                svc.current_build(key, target)
            except Exception:
                folder = Path(tempfile.mkdtemp())
                svc.templates.build(
                    key, source_dir=generate_source(folder, key, parse_size(sys.argv[2]))
                )
        else:
            svc.templates.build(key)
        build = svc.current_build(key, target)
        with connect(target, autocommit=True, purpose="bench") as adm:
            choice = svc.clone_choice(adm, target, build)
            print(f"{key}: {build.size_bytes or 0:,} bytes, {choice.label}")
            for i in range(rounds + 2):
                order = list(times)
                for variant in order[i % 3 :] + order[: i % 3]:
                    if variant != "raw":
                        role_pool.fill(svc, 1)  # untimed, as monk's idle time does
                        svc.root_passwords.settle(10)
                    admin.checkpoint(adm)
                    os.sync()
                    time.sleep(0.05)
                    name = f"cf {secrets.token_hex(4)}"
                    started = time.perf_counter()
                    if variant == "raw":
                        db = f"cf_raw_{secrets.token_hex(4)}"
                        admin.create_database(adm, db, template=build.database, choice=choice)
                    elif variant == "intent_first":
                        svc.provision(name, template=key)
                    else:
                        clone_first(svc, build, name)
                    elapsed = (time.perf_counter() - started) * 1000
                    if variant == "raw":
                        admin.drop_database(adm, db)
                    else:
                        made.append(name)
                    if i >= 2:  # the first two rounds warm up
                        times[variant].append(elapsed)
        raw = statistics.median(times["raw"])
        for variant, ms in times.items():
            p50 = statistics.median(ms)
            print(f"{variant:13s} p50 {p50:7.2f} ms  min {min(ms):7.2f}  / raw {p50 / raw:.3f}")
        for name in made:
            with contextlib.suppress(Exception):
                purge.request_purge(svc, name, archive=False, forget=True)


if __name__ == "__main__":
    main()
