"""engagerec_study: the study harness around the engagerec library (``pip install 'engagerec[study]'``).

It trains towers x seeds and reports them (``compare``, ``report``), refits a chosen run on its
training and validation rows (``refit``), fits the scikit-learn GBDT reference in a process of its
own (``gbdt``, ``gbdt_fit``), and writes docs/RESULTS.md from its cached sections (``sections``).
Its ``engagerec`` commands (compare, refit, results) reach the CLI through the
``engagerec.commands`` entry points (``commands``). The library never imports this package.
"""
