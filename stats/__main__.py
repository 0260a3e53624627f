from stats.cli import main

main()
