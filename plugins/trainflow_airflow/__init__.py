"""trainflow's Airflow side: what the DAG files share and the Airflow plugin (UI links).

Installed as the package ``trainflow.airflow`` (its source lives in ``plugins/``), so DAG
files, tests and every Airflow process import it the same way.
"""
