"""The deploy controller: blue-green deploys with Docker, through etcd only.

    plan -> start -> register -> render/reload (the routers' reports) -> switch
    -> destroy, with ``undo`` rolling back whatever the ``Journal`` says was done

It writes desired state to etcd and waits for the routers to report it live;
it never touches nginx, and nothing here imports the router.
"""
