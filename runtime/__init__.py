"""The EIE runtime: fixed-point simulator, cycle and energy model, ORT custom ops, validation."""
