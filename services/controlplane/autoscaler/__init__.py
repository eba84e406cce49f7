"""The autoscaler: per-model replica counts decided by the control-plane leader (reactive windows
after Knative's KPA, a Holt-Winters forecast as a floor, limits and budgets, scale to zero), and
the actuators' interfaces (KEDA's external scaler protocol, capacity for a server pool)."""
