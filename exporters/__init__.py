"""bytedeploy.exporters"""
