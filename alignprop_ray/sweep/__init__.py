"""Ray Tune sweeps over experiment configs: one trial = one Ray Train run, tracked as MLflow child runs.

    sweep = load_sweep("sweeps/smoke.yaml", ["train.steps=4"])   # validate everything first
    outcome = run_sweep(sweep)                                    # Tuner.fit (or Tuner.restore with resume)

Modules: ``config`` (the sweep file), ``space`` (dotted fields -> Tune domains), ``stoppers`` (mode
collapse, NaN), ``trial`` (the Tune function that drives one Ray Train run), ``tracking`` (parent/child
MLflow runs), ``mlflow_server`` (a local server in front of SQLite), ``summary`` (table, best trial,
Pareto front), ``launch`` (``alignprop-ray sweep`` and ``alignprop-ray demo``), ``protocol`` (a comparison
file: methods compared at equal training time, each at its picked lr) and ``compare`` (``alignprop-ray
compare``: its selection and seeds rounds, one sweep per method and round).

Importing this package (and ``config``/``space``) does not import Ray, torch or MLflow.
"""
