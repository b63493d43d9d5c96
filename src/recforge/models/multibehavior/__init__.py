"""Multi-behaviour models: trained on every behaviour of the training part (views, carts,
purchases...), ranking items for the target behaviour (``data.target_behavior``)."""
