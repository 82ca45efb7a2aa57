"""Files in and out: format detection (`formats`), streaming validated readers (`readers`) and atomic
writers (`writers`). Knows nothing of models, devices or engines."""
