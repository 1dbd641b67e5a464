"""Scale-out: the same ASGI app as a Ray Serve deployment. Each replica builds it, so each loads and
hash-checks the engine itself (from shared storage, or a copy per node at the same path); Ray Serve's proxy
spreads requests over the replicas, restarts dead ones and autoscales between bounds.
"""
from __future__ import annotations

from pathlib import Path

from kiln.errors import KilnError
from kiln.serve.app import ServeOptions, build_app


def parse_autoscale(text: str) -> tuple[int, int]:
    """`1,4` -> (1, 4)."""
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise KilnError(f"--autoscale: expected MIN,MAX replicas, e.g. 1,4; got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise KilnError(f"--autoscale: expected 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


def kiln_deployment(engine_dir: Path, options: ServeOptions, load_options: dict, *, replicas: int = 1,
                    autoscale: tuple[int, int] | None = None, cpus_per_replica: float = 1.0):
    """A bound Ray Serve application serving `engine_dir`."""
    from ray import serve

    engine_dir = str(Path(engine_dir).resolve())

    def builder():  # a plain function: Ray Serve calls it on each replica (a partial would pass as an ASGI app)
        return build_app(engine_dir, options, **load_options)

    @serve.ingress(builder)
    class KilnEngine:
        """One replica: the app `builder` makes, with its engine and its scheduler."""

    scaling = ({"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                       "target_ongoing_requests": options.max_batch}}
               if autoscale else {"num_replicas": replicas})
    # Each replica batches up to max_batch sequences and queues max_queue more: let Ray send it that many.
    deployment = serve.deployment(KilnEngine, name="kiln", max_ongoing_requests=options.max_batch + options.max_queue,
                                  ray_actor_options={"num_cpus": cpus_per_replica}, **scaling)
    return deployment.bind()


def run_on_ray(engine_dir: Path, options: ServeOptions, load_options: dict, *, host: str, port: int,
               replicas: int = 1, autoscale: tuple[int, int] | None = None, address: str | None = None,
               cpus_per_replica: float = 1.0, blocking: bool = True):
    """Connect to the Ray cluster at `address` (RAY_ADDRESS; a local one is started when there is none) and run
    the deployment behind Serve's HTTP proxy on host:port."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise KilnError("--ray needs Ray Serve: pip install 'torchkiln[serve]'") from None
    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    application = kiln_deployment(engine_dir, options, load_options, replicas=replicas, autoscale=autoscale,
                                  cpus_per_replica=cpus_per_replica)
    return serve.run(application, name="kiln", route_prefix="/", blocking=blocking)
