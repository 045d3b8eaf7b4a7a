"""Evaluation building blocks: the held-out test sets (``testsets``), the pre-flight of an evaluation
run (``preflight``), one system on the test sets (``reports``), its result files read back
(``results``), two systems paired (``compare``, ``plots``), the scripts' command lines (``cli``), and
classification (``classification``)."""
