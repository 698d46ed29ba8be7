"""One model family per file; see bytedeploy.registry for the list."""
