"""Code that runs inside PostgreSQL, in PL/Python (plpython3u).

Standard library plus ``requests`` only: these modules run on the server's own
interpreter (Debian's system python3 with python3-requests), never in the
client's virtualenv. ``extension/build.py`` writes their source into the table
``omop_emb_internal.python_module``; ``omop_emb_internal._bootstrap()`` loads
them into ``GD`` once per session (the version, from the file VERSION, is passed
in). Nothing here imports ``plpy`` at module level, so plain pytest can import
and test every module.
"""
