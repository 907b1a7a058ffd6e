"""The review page of ``omop-emb-pg ui`` (the ``ui`` extra: starlette, jinja2, uvicorn).

``app.create_app`` builds the Starlette application; ``server.run`` serves it with uvicorn
after checking the bind address (loopback unless TLS or ``insecure_bind``). Nothing is
imported here, so that the command line can read the defaults without the extra installed.
"""
