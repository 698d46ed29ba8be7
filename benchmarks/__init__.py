"""bytedeploy.benchmarks"""
