"""bytedeploy.runtimes"""
