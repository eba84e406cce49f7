"""Traffic policies (issue 12), the parts that routers and the control plane share: the records
checked into plain values (records.py), references and cycles between them (graph.py) and the
windows of figures a canary is judged by (window.py)."""
