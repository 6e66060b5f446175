"""``exitnas search RUN_DIR`` and ``exitnas dashboard RUN_DIR``."""
from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path

from . import command
from ..errors import RunDirError


@command("search", help="multi-objective NSGA-II search over the trained supernet under a cost "
                        "budget (rerun to continue)")
class Search:
    @staticmethod
    def add_arguments(p):
        p.add_argument("run_dir", metavar="RUN_DIR")
        p.add_argument("--trials", type=int, help="complete trials the study should hold "
                       "(default: search.trials)")
        p.add_argument("--budget", help="expected-cost budget: <= 1 is a fraction of the "
                       "backbone's cost, else an amount in the cost model's unit (20M, 1.5G "
                       "MACs; 3.5ms); default: search.budget / search.budget_fraction")
        p.add_argument("--path-budget", help="worst-case path budget, same units")
        p.add_argument("--backend", choices=("optuna", "ray"), help="default: search.backend")
        p.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")
        p.add_argument("--storage", help="SQLAlchemy URL or journal file (default: $EXITNAS_STORAGE, "
                       "else the storage this run used last, else RUN/search/study.log)")
        p.add_argument("--study-name", help="default: exitnas-<space>-<run dir name>")
        p.add_argument("--sampler", choices=("nsga2", "random"))
        p.add_argument("--seed", type=int)
        p.add_argument("--workers", type=int, help="concurrent Ray trials (default: search.workers)")
        p.add_argument("--population", type=int, help="NSGA-II population size")

    @staticmethod
    def run(args):
        from ..search import SearchOptions, run_search

        for name in ("trials", "workers", "population"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise RunDirError(f"--{name} {value}: must be >= 1")
        if args.address and args.backend != "ray":
            raise RunDirError(f"--address {args.address}: only used with --backend ray")
        result = run_search(args.run_dir, SearchOptions(
            trials=args.trials, budget=args.budget, path_budget=args.path_budget,
            backend=args.backend, address=args.address, storage=args.storage,
            study_name=args.study_name, sampler=args.sampler, seed=args.seed,
            workers=args.workers, population=args.population))
        s = result.summary
        rate = f", {s['trials_per_s']:.1f} trials/s" if s.get("trials_per_s") else ""
        cache = s.get("cache", {})
        rate += f"; depth caches {cache.get('built', 0)} built, {cache.get('loaded', 0)} read"
        print(f"search: study {result.study_name!r} in {result.storage}: {result.trials} complete "
              f"trials ({s['committed_by_this_process']} run now{rate}); {len(result.front)} on "
              f"the feasible front, hypervolume {result.hypervolume:.4f} (reference accuracy 0, "
              f"relative cost {s['reference_point']['relative_cost']:.3f})")
        print(f"front: {args.run_dir}/search/front.md")


@command("dashboard", help="serve the run's Optuna study in optuna-dashboard (127.0.0.1 unless "
                           "--host says otherwise)")
class Dashboard:
    @staticmethod
    def add_arguments(p):
        p.add_argument("run_dir", metavar="RUN_DIR")
        p.add_argument("--port", type=int, default=8080)
        p.add_argument("--host", default="127.0.0.1",
                       help="address to bind; anything but 127.0.0.1 exposes the study")
        p.add_argument("--storage", help="the run's storage URL, if it holds a password")

    @staticmethod
    def run(args):
        from ..rundir import RunDir
        from ..search._storage import resolve_study

        if not 0 <= args.port <= 65535:
            raise RunDirError(f"--port {args.port}: not a TCP port (0-65535)")
        if not _valid_host(args.host):
            raise RunDirError(f"--host {args.host!r}: not an IP address or host name")
        run = RunDir(args.run_dir)
        space = run.space()
        if not (run.path / "search" / "study.json").is_file():
            raise RunDirError(f"{run.path / 'search' / 'study.json'}: no search yet; run "
                              f"`exitnas search {args.run_dir}` first")
        spec, name = resolve_study(run, storage=args.storage, study_name=None,
                                   default_name=f"exitnas-{space.name}")
        if spec.journal and not Path(spec.journal).is_file():  # opening would create it
            raise RunDirError(f"{spec.journal}: the run's study journal is missing")
        try:
            from optuna_dashboard import wsgi
        except ImportError:
            raise RunDirError("optuna-dashboard is not installed (pip install "
                              "'exitnas[dashboard]')") from None
        app = wsgi(spec.open())
        server = _bind(args.host, args.port, app)  # a busy port fails here, before any output
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"dashboard: warning: --host {args.host} exposes the study (and its notes "
                  "editor) to every machine that can reach this address", file=sys.stderr)
        host = f"[{args.host}]" if ":" in args.host else args.host
        port = server.server_address[1]
        print(f"dashboard: study {name!r} at http://{host}:{port}/dashboard/ "
              f"(storage {spec.display}); Ctrl-C stops it", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
        return 0


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")


def _valid_host(host: str) -> bool:
    """An IPv4 / IPv6 literal or a DNS host name (allowlist; anything else never reaches
    the socket layer)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return len(host) <= 253 and _HOSTNAME.fullmatch(host) is not None


def _bind(host: str, port: int, app):
    """A wsgiref server for ``app`` bound to ``host:port`` (IPv6 when ``host`` has a colon)."""
    import socket
    from wsgiref.simple_server import WSGIServer, make_server

    class Server(WSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        return make_server(host, port, app, server_class=Server)
    except OSError as err:
        raise RunDirError(f"--host {host} --port {port}: cannot serve there "
                          f"({err.strerror or err})") from None
