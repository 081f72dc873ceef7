// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {Initializable} from "@openzeppelin/contracts/proxy/utils/Initializable.sol";
import {Address} from "@openzeppelin/contracts/utils/Address.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {IShareToken} from "./interfaces/IShareToken.sol";

/// @title ShareToken
/// @notice Ownership shares of one model, deployed as a minimal clone per model. Only the ledger mints.
/// Inference revenue paid with `deposit` accrues per share through a magnified revenue-per-share
/// accumulator; per-account corrections updated in `_update` make mint, burn and transfer neutral to every
/// holder's entitlement. Holders pull their revenue with `claim`. Accounting never reads the ETH balance,
/// and plain ETH transfers are refused, so forced ETH changes nobody's fraction. All divisions round down,
/// in favour of the pool.
contract ShareToken is ERC20, Initializable, ReentrancyGuardTransient, IShareToken {
    using SafeCast for uint256;
    using SafeCast for int256;

    /// @notice Fixed-point scale of the revenue-per-share accumulator.
    uint256 public constant MAGNITUDE = 2 ** 128;

    string private _tokenName;
    string private _tokenSymbol;

    // Storage is packed so that deposit and claim write slots made non-zero by `initialize`:
    // the first deposit of a model then costs no more than later ones (except the accumulator itself).

    /// @notice The only account allowed to mint (the ContributionLedger).
    address public minter;
    /// @notice Total wei deposited through `deposit` (uint96: up to 7.9e28 wei in a token's lifetime).
    uint96 public totalDeposited;
    /// @notice The model these shares belong to.
    uint64 public modelId;
    /// @notice Total wei paid out through `claim`.
    uint128 public totalClaimed;
    /// @notice Revenue per share, scaled by MAGNITUDE.
    uint256 public magnifiedRevenuePerShare;

    mapping(address account => int256) private _corrections;
    mapping(address account => uint256) private _withdrawn;

    /// @notice The caller is not the minter.
    error ShareTokenNotMinter(address caller);
    /// @notice A deposit was made while no shares exist.
    error ShareTokenNoSupply();
    /// @notice A deposit of zero wei.
    error ShareTokenZeroDeposit();
    /// @notice The account has nothing to claim.
    error ShareTokenNothingToClaim(address account);
    /// @notice Plain ETH transfers are refused; use deposit.
    error ShareTokenDirectTransferRefused(address sender, uint256 value);
    /// @notice The minter is zero.
    error ShareTokenInvalidMinter();

    /// @notice Inference revenue was deposited for the model.
    event RevenueDeposited(bytes32 indexed requestId, address indexed payer, uint256 amount, uint256 modelId);
    /// @notice A holder claimed revenue.
    event RevenueClaimed(address indexed account, uint256 amount);

    constructor() ERC20("", "") {
        _disableInitializers();
    }

    /// @inheritdoc IShareToken
    function initialize(string calldata name_, string calldata symbol_, uint256 modelId_, address minter_)
        external
        initializer
    {
        if (minter_ == address(0)) revert ShareTokenInvalidMinter();
        _tokenName = name_;
        _tokenSymbol = symbol_;
        modelId = modelId_.toUint64();
        minter = minter_;
    }

    /// @notice Refuses plain ETH; revenue must go through `deposit`.
    receive() external payable {
        revert ShareTokenDirectTransferRefused(msg.sender, msg.value);
    }

    /// @inheritdoc IShareToken
    function mint(address to, uint256 amount) external {
        if (msg.sender != minter) revert ShareTokenNotMinter(msg.sender);
        _mint(to, amount);
    }

    /// @notice Pays inference revenue, shared pro rata among current holders.
    /// @param requestId The inference request this pays for (recorded in the event).
    function deposit(bytes32 requestId) external payable {
        if (msg.value == 0) revert ShareTokenZeroDeposit();
        uint256 supply = totalSupply();
        if (supply == 0) revert ShareTokenNoSupply();
        magnifiedRevenuePerShare += (msg.value * MAGNITUDE) / supply;
        totalDeposited += msg.value.toUint96();
        emit RevenueDeposited(requestId, msg.sender, msg.value, modelId);
    }

    /// @notice Sends the caller all revenue accrued to them so far.
    /// @return amount The wei sent.
    function claim() external nonReentrant returns (uint256 amount) {
        amount = claimableOf(msg.sender);
        if (amount == 0) revert ShareTokenNothingToClaim(msg.sender);
        _withdrawn[msg.sender] += amount;
        totalClaimed += amount.toUint128();
        emit RevenueClaimed(msg.sender, amount);
        Address.sendValue(payable(msg.sender), amount);
    }

    /// @notice Revenue accrued to `account` and not yet claimed, in wei (rounded down).
    function claimableOf(address account) public view returns (uint256) {
        return accumulatedOf(account) - _withdrawn[account];
    }

    /// @notice Revenue ever accrued to `account`, in wei (rounded down).
    function accumulatedOf(address account) public view returns (uint256) {
        int256 magnified = (magnifiedRevenuePerShare * balanceOf(account)).toInt256() + _corrections[account];
        return magnified.toUint256() / MAGNITUDE;
    }

    /// @notice Revenue already claimed by `account`, in wei.
    function claimedOf(address account) external view returns (uint256) {
        return _withdrawn[account];
    }

    /// @notice The token name.
    function name() public view override returns (string memory) {
        return _tokenName;
    }

    /// @notice The token symbol.
    function symbol() public view override returns (string memory) {
        return _tokenSymbol;
    }

    function _update(address from, address to, uint256 value) internal override {
        super._update(from, to, value);
        int256 magnified = (magnifiedRevenuePerShare * value).toInt256();
        if (from != address(0)) _corrections[from] += magnified;
        if (to != address(0)) _corrections[to] -= magnified;
    }
}
