"""bytedeploy.plugins"""
