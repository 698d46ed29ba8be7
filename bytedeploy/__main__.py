"""`python -m bytedeploy ...` runs the command line, like the `bytedeploy` script."""

from bytedeploy.cli import main

if __name__ == "__main__":
    main()
