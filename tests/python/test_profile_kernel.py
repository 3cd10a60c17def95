"""perf/profile_kernel.py on the CPU: its workloads run (a tiny problem), and its summary of an Nsight Compute
source-page CSV adds each counter per region (before / between / after the HMMAs) and per memory opcode."""
import pytest

from conftest import load_perf_script


@pytest.mark.parametrize("kind,dtype,data", [("forward", "bf16", "kernelbench"), ("train_forward", "tf32", "kernelbench"),
                                             ("grad_input", "tf32", "randn")])
def test_workloads_run_on_cpu(kind, dtype, data):
    profile = load_perf_script("profile_kernel")
    assert profile.main(["run", kind, "--dtype", dtype, "--data", data, "--device", "cpu"]) == 0


CSV = '''"Kernel Name","implicit_gemm_conv_kernel"
"Address","Source","Instructions Executed","Warp Stall Sampling (All Samples)","L2 Theoretical Sectors Global","stall_long_sb"
"","","inst","","sector",""
"0x10","MOV R1, c[0x0][0x28]","100","5","0","1"
"0x20","LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64]","1,000","40","4000","30"
"0x30","@P0 LDL R7, [R1+0x4]","10","2","0","2"
"0x40","HMMA.16816.F32.BF16 R8, R12, R16, R8","2000","60","0","0"
"0x50","LDSM.16.M88.4 R12, [R3]","500","9","0","0"
"0x60","HMMA.16816.F32.BF16 R20, R12, R18, R20","2000","50","0","0"
"0x70","STG.E.U16 desc[UR4][R6.64], R9","300","20","1200","0"
"0x80","EXIT","1","0","0","0"
'''


def test_summary_splits_counters_by_region_and_opcode(tmp_path):
    profile = load_perf_script("profile_kernel")
    path = tmp_path / "source.csv"
    path.write_text(CSV)
    totals = profile.summarize(path)
    executed, sectors = "Instructions Executed", "L2 Theoretical Sectors Global"
    assert totals["total"][executed] == 5911 and totals["total"][sectors] == 5200
    assert totals["region:before the first HMMA"][executed] == 1110
    assert totals["region:HMMA loop"][executed] == 4500  # both HMMAs and the ldmatrix between them
    assert totals["region:after the last HMMA"][executed] == 301
    assert totals["opcode:LDGSTS"][sectors] == 4000 and totals["opcode:STG"][sectors] == 1200
    assert totals["opcode:LDL"]["stall_long_sb"] == 2 and totals["opcode:LDSM"][executed] == 500
    assert "opcode:MOV" not in totals and "opcode:HMMA" not in totals
    profile.print_summary(totals)  # prints without error
