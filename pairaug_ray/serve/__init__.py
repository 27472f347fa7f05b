"""Ray Serve app: the rewriter, the InterAug generator, the IntraAug editor and the scorer as
deployments (each loads its stage's model once per replica) behind one FastAPI ingress.

Modules: ``options`` (deployment names, Serve options, request limits; light to import), ``config``
(``ServeConfig``: the stage configs + options), ``api`` (request bodies, error envelope), ``inputs``
(image checks and PHI-free decoding, chat prompt matching), ``deployments`` (the model replicas),
``app`` (the ingress, ``build_app`` for ``serve run``/``serve deploy``, ``run_serve``).

Usage::

    serve run jobs/configs/serve_config.yaml
    python -c "from pairaug_ray.serve.app import run_serve; from pairaug_ray.serve.config import ServeConfig; run_serve(ServeConfig())"

Nothing is imported here, so ``import pairaug_ray.serve`` stays free of Ray Serve and torch.
"""
