"""Serve a policy over openpi's websocket protocol (drop-in for openpi's serve_policy.py):

    python -m runners.serve policy=pi05 policy.checkpoint=... backend=compile port=8000

Clients: openpi's `WebsocketClientPolicy(host, port)` (openpi-client on PyPI), or this harness's
`policy=remote host=... port=...`. See runners/server.py for the protocol, batching and shutdown.
"""

from __future__ import annotations

import asyncio
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from runners import CONF_DIR
from runners.build import build_policy
from runners.server import PolicyServer


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO)
    policy = build_policy(cfg)  # fails before the port opens if the checkpoint is missing
    meta = {"policy": OmegaConf.to_container(cfg.policy, resolve=True), "steps": cfg.steps, "backend": cfg.backend}
    server = PolicyServer(policy, cfg.host, cfg.port, cfg.max_batch, cfg.batch_window_ms, metadata=meta)
    asyncio.run(server.run())


if __name__ == "__main__":
    main()
