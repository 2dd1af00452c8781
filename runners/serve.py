"""Serve a policy over openpi's websocket protocol (drop-in for openpi's serve_policy.py):

    python -m runners.serve policy=pi05 policy.checkpoint=... backend=compile port=8000

Clients: openpi's `WebsocketClientPolicy(host, port)` (openpi-client on PyPI), or this harness's
`policy=remote host=... port=...`. See runners/server.py for the protocol, batching and shutdown.

It listens on 127.0.0.1 unless `host=0.0.0.0` is given; `api_key=...` then keeps other clients out
(no key, ours or a remote policy's, goes into the metadata sent to clients).
"""

from __future__ import annotations

import asyncio
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from runners import CONF_DIR
from runners.build import build_policy
from runners.server import PolicyServer, bound_socket


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO)
    sock = bound_socket(cfg.host, cfg.port)  # a taken or bad port fails now, not after the policy's load
    policy = build_policy(cfg)  # fails before any client connects if the checkpoint is missing
    if hasattr(policy, "prepare"):  # compile and capture every batch size now: no client's call pays for it
        prepared = policy.prepare(int(cfg.max_batch))
        if prepared:
            logging.getLogger("runners.serve").info(
                "policy ready for batch sizes %s in %.1f s (compilation and graph capture)", sorted(prepared),
                sum(prepared.values()))
    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    policy_cfg.pop("api_key", None)  # policy=remote behind this server: its upstream key is no client's business
    meta = {"policy": policy_cfg, "steps": cfg.steps, "backend": cfg.backend,
            # what clients hash to tell servers apart (runners/build.py policy_identity)
            "identity": getattr(policy, "identity", None)}
    server = PolicyServer(policy, cfg.host, cfg.port, cfg.max_batch, cfg.batch_window_ms, metadata=meta,
                          max_message_mb=cfg.max_message_mb, max_connections=cfg.max_connections, sock=sock,
                          api_key=None if cfg.api_key is None else str(cfg.api_key))  # api_key=1234 is an int to Hydra
    asyncio.run(server.run())


if __name__ == "__main__":
    main()
