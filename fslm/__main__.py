from fslm.cli import main

main()
