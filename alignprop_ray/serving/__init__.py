"""Rewards as a shared service: reward models on Ray Serve, differentiable through the network.

A reward term with ``serve`` settings (``reward: {aesthetic: {weight: 1.0, serve: {max_replicas: 2}}}``)
runs as a Ray Serve application of its own instead of inside every training worker:

    specs.py       which terms of an experiment are served, and the deployment each maps to (no Ray)
    deployment.py  the Serve deployment: builds the reward in its replicas, batches requests, returns the
                   reward and dR/dpixels (alignprop_ray/rewards/remote.py has the math)
    pool.py        start the deployments a run or sweep needs (and wait for them), stop them at the end
    client.py      the worker's side: a RemoteReward whose requests time out and are retried once

Same reward + same options (the reward model's and the serve settings) = same application: every trial
of a sweep that asks for it shares it. docs/rewards.md, "Served rewards".
"""
