"""Traffic policy on the router's request path (issue 12): a name clients ask for resolves
through splits, canaries, fallback chains, rules and ensembles to deployments, each served by the
dispatcher's ordinary path. Pure decisions (choose.py, rules.py, combine.py) are apart from the
async parts (executor.py, ensemble.py), the etcd records (table.py) and canary figures (stats.py).
"""
