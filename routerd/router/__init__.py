"""The router: ``routerd run`` follows etcd and keeps nginx serving a validated,
confirmed config (``render --dry-run`` previews it, ``apps`` edits its input).

    follow -> loader/model -> render -> validate -> install -> nginx -> status

``pipeline.Router.apply`` holds that straight line; ``daemon`` wires the tasks
around it. Nothing here imports the deploy controller.
"""
