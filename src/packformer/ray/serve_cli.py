"""`packformer serve --ray ...`: the bridge from the serve command's arguments to packformer.ray.serve."""
from __future__ import annotations

import sys


def run(args, settings) -> int:
    """Serve with `settings` (built by the serve command from its flags) on Ray Serve until SIGINT/SIGTERM."""
    from . import require_ray
    from .dataset import model_spec

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
                         ray_address=args.ray_address)
