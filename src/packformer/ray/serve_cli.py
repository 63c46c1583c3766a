"""`packformer serve --ray ...`: the bridge from the serve command's arguments to packformer.ray.serve."""
from __future__ import annotations

import os
import sys

HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"    # Ray Serve's switch to its HAProxy ingress (direct to replicas)


def run(args, settings) -> int:
    """Serve with `settings` (built by the serve command from its flags) on Ray Serve until SIGINT/SIGTERM."""
    from . import require_ray
    from .dataset import model_spec

    if args.ingress == "haproxy":
        if args.ray_address:
            print("packformer serve --ray: error: --ingress haproxy starts its own local Ray; a joined cluster's "
                  "ingress is set where it was started (RAY_SERVE_ENABLE_HA_PROXY=1)", file=sys.stderr)
            return 1
        # Read by Ray Serve's constants when imported, here and in every process of the Ray started below
        # (they inherit this environment): so set before the first import of ray.serve.
        os.environ[HAPROXY_ENV] = "1"
    try:
        require_ray()
        import ray.serve  # noqa: F401
    except ImportError as e:
        print(f"packformer serve --ray: error: {e}", file=sys.stderr)
        return 1
    from .serve import serve_forever

    gpus = args.gpus_per_replica
    if gpus is None:
        device = str(args.device or "cpu")
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        gpus = 1 if device.startswith("cuda") else 0
    return serve_forever(model_spec(args.model), settings, replicas=args.replicas, gpus_per_replica=gpus,
                         cpus_per_replica=args.cpus_per_replica, dtype=args.dtype, host=args.host, port=args.port,
                         ray_address=args.ray_address, task=args.task)
